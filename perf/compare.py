"""The body of perf/compare.sh (run that; its header documents the knobs).

Sets up each path on loopback, measures it with perf/client.py against perf/targets.py, and
writes perf/results/DATE-HOST.md: a markdown table plus every raw figure as JSON.

Per path (a "row"):
- throughput down (from the source) and up (to the sink), BYTES each, REPEATS times; the
  table shows the median;
- CPU seconds per GB (1e9 bytes) of every process on the path: utime+stime from
  /proc/PID/stat before and after each transfer (socat forks per connection: its reaped
  children's times are counted, after waiting for the children to exit); the client's from
  wait4; the whole machine's busy time from /proc/stat (includes whatever else runs);
- new-connection first byte (connect until the target's greet byte) p50/p99, CONNECTS times;
- 1-byte echo round trip p50/p99 on one connection, ECHOES times;
- for ringfwd paths, resident memory per connection with IDLE_CONNS idle connections held
  open, on freshly started ringfwd processes: (VmRSS after - VmRSS before) / IDLE_CONNS.
"""

import json
import os
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from queue import Empty, Queue

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TCK = os.sysconf("SC_CLK_TCK")
LOCAL = "127.0.0.1"


def env_int(name, default):
    return int(os.environ.get(name, default))


BYTES = env_int("BYTES", 1 << 30)
REPEATS = env_int("REPEATS", 3)
CONNECTS = env_int("CONNECTS", 200)
ECHOES = env_int("ECHOES", 2000)
IDLE_CONNS = env_int("IDLE_CONNS", 10000)
# containerd 1.6 holds four descriptors and one OS thread per forwarded connection (measured
# here: it runs each in netns.Do): under a 20,000-descriptor limit it cannot hold 10,000.
IDLE_CONNS_CRI = env_int("IDLE_CONNS_CRI", min(IDLE_CONNS, 4000))
SOCAT_BUF = env_int("SOCAT_BUF", 131072)
RINGFWD = os.environ.get("RINGFWD_BIN", os.path.join(REPO, "target/release/ringfwd"))
CONTAINERD = os.environ.get("CONTAINERD", "auto")  # auto | 0 | 1
# The hook for measuring ringfwd with metrics on (the flag lands with the metrics work):
# off (default), on, or both (every ringfwd row twice). RINGFWD_METRICS_ARGS is appended to
# `ringfwd forward`, RINGFWD_SERVE_METRICS_ARGS to `ringfwd serve`.
METRICS = os.environ.get("RINGFWD_METRICS", "off")
# ringfwd's data planes to measure, one row each (`--data-plane`).
DATA_PLANES = [d for d in os.environ.get("DATA_PLANES", "epoll,copy").split(",") if d]
METRICS_ARGS = shlex.split(
    os.environ.get("RINGFWD_METRICS_ARGS", "--metrics-addr 127.0.0.1:0")
)
SERVE_METRICS_ARGS = shlex.split(os.environ.get("RINGFWD_SERVE_METRICS_ARGS", ""))
ROWS = [r for r in os.environ.get("ROWS", "").split(",") if r]
KNOBS = [
    "BYTES",
    "REPEATS",
    "CONNECTS",
    "ECHOES",
    "IDLE_CONNS",
    "IDLE_CONNS_CRI",
    "SOCAT_BUF",
    "RINGFWD_BIN",
    "CONTAINERD",
    "RINGFWD_METRICS",
    "DATA_PLANES",
    "FIXTURE_BIN",
    "RINGFWD_METRICS_ARGS",
    "RINGFWD_SERVE_METRICS_ARGS",
    "ROWS",
    "WAIT_FOR_LOAD",
]

LOGDIR = tempfile.mkdtemp(prefix="ringfwd-compare-")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# /proc readings


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pid, children=False):
    f = stat_fields(pid)
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime: reaped children
    return ticks / TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def loadavg():
    """The 1, 5 and 15-minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine_busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    return (sum(v[:8]) - v[3] - v[4]) / TCK


def live_children(pid):
    n = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                n += len(f.read().split())
    except FileNotFoundError:
        pass
    return n


def listen_ports(pid):
    """TCP ports `pid` listens on (IPv4), from its socket inodes and /proc/net/tcp."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    ports = []
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            p = line.split()
            if p[3] == "0A" and p[9] in inodes:  # TCP_LISTEN
                ports.append(int(p[1].split(":")[1], 16))
    return ports


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A process on a path, started by us; `children`: count reaped children's CPU too."""

    def __init__(self, name, argv, children=False, stdin=None):
        self.name, self.argv, self.children = name, argv, children
        self.log = os.path.join(LOGDIR, f"{name.replace(' ', '_')}-{time.time_ns()}.log")
        self.p = subprocess.Popen(
            argv,
            stdin=stdin or subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
        )
        self.pid = self.p.pid
        self.lines = Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, pattern, timeout=30):
        """The first stdout line matching `pattern` (a regex): its match."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                line = None
            if line is None:
                raise RuntimeError(
                    f"{self.name}: no line matching {pattern!r}; log {self.log}:\n"
                    + open(self.log).read()[-2000:]
                )
            m = re.search(pattern, line)
            if m:
                return m

    def cpu(self):
        return cpu_seconds(self.pid, self.children)

    def settle(self):
        """socat: wait until the per-connection children are gone (and reaped)."""
        if self.children:
            deadline = time.monotonic() + 10
            while live_children(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Stack:
    """One path: its processes (`measured`: whose CPU the row reports) and where the client
    connects for each target."""

    def __init__(self):
        self.procs, self.measured, self.entry = [], [], {}

    def add(self, proc, measured=True):
        self.procs.append(proc)
        if measured:
            self.measured.append(proc)
        return proc

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def start_targets(bind=LOCAL, netns=None):
    argv = [sys.executable, os.path.join(HERE, "targets.py"), "--bind", bind]
    if netns:
        argv = ["nsenter", f"--net={netns}"] + argv
    p = Proc("target", argv)
    ports = json.loads(p.wait_line(r"^\{.*\}$").group(0))
    return p, ports


def socat(name, dest_host, dest_port):
    p = Proc(
        name,
        [
            "socat",
            "-b",
            str(SOCAT_BUF),
            f"TCP4-LISTEN:0,bind={LOCAL},reuseaddr,fork,backlog=4096",
            f"TCP4:{dest_host}:{dest_port}",
        ],
        children=True,
    )
    deadline = time.monotonic() + 10
    while not (ports := listen_ports(p.pid)):
        if time.monotonic() > deadline or p.p.poll() is not None:
            raise RuntimeError(f"{name} did not listen: {open(p.log).read()}")
        time.sleep(0.02)
    return p, ports[0]


def ringfwd_forward(upstream, remotes, metrics, dp):
    argv = [RINGFWD, "forward", "--data-plane", dp] + upstream + ["--address", LOCAL]
    argv += [f":{r}" for r in remotes] + (METRICS_ARGS if metrics else [])
    p = Proc("ringfwd forward", argv)
    local = {}
    while len(local) < len(remotes):
        m = p.wait_line(r"Forwarding from [\d.]+:(\d+) -> (\d+)")
        local[int(m.group(2))] = int(m.group(1))
    return p, local


def ringfwd_serve(metrics, dp):
    argv = [RINGFWD, "serve", "--data-plane", dp, "--listen", f"{LOCAL}:0"]
    p = Proc("ringfwd serve", argv + (SERVE_METRICS_ARGS if metrics else []))
    return p, p.wait_line(r"Serving port-forward on (\S+)").group(1)


TARGETS = ["source", "sink", "echo", "greet"]


# ---------------------------------------------------------------------------------------------
# Paths


def path(targets_at, build):
    """A factory of fresh stacks: the targets (`targets_at(stack)` gives their host and
    ports), then `build(stack, host, ports)` adds what sits in between and sets the entry."""

    def make():
        s = Stack()
        host, t = targets_at(s)
        build(s, host, t)
        return s

    return make


def path_direct(targets_at):
    def build(s, host, t):
        s.entry = {k: (host, t[k]) for k in TARGETS}

    return path(targets_at, build)


def path_socat(targets_at, hops):
    def build(s, host, t):
        for k in TARGETS:
            dest = (host, t[k])
            for hop in range(hops, 0, -1):  # the hop nearest the target starts first
                p, port = socat("socat" if hops == 1 else f"socat {hop}", *dest)
                s.add(p)
                dest = (LOCAL, port)
            s.entry[k] = dest

    return path(targets_at, build)


def path_ringfwd_serve(targets_at, metrics, dp):
    def build(s, _host, t):
        serve, url = ringfwd_serve(metrics, dp)
        s.add(serve)
        fwd, local = ringfwd_forward(["--url", url], [t[k] for k in TARGETS], metrics, dp)
        s.add(fwd)
        s.entry = {k: (LOCAL, local[t[k]]) for k in TARGETS}

    return path(targets_at, build)


def path_ringfwd_cri(targets_at, pod, metrics, dp):
    def build(s, _host, t):
        upstream = ["--runtime-endpoint", pod["endpoint"], pod["sandbox"]]
        fwd, local = ringfwd_forward(upstream, [t[k] for k in TARGETS], metrics, dp)
        s.add(fwd)
        s.add(pod["containerd"])
        s.entry = {k: (LOCAL, local[t[k]]) for k in TARGETS}

    return path(targets_at, build)


class Shared:
    """A process the harness keeps across rows (containerd, the pod's target): stop is a no-op."""

    def __init__(self, name, pid, children=False):
        self.name, self.pid, self.children = name, pid, children

    def cpu(self):
        return cpu_seconds(self.pid, self.children)

    def settle(self):
        pass

    def stop(self):
        pass


def local_targets(stack):
    p, ports = start_targets()
    stack.add(p)
    return LOCAL, ports


# ---------------------------------------------------------------------------------------------
# Measuring


def run_client(what, addr, n, timeout=600):
    """Run client.py; returns (its JSON, its CPU seconds)."""
    argv = [sys.executable, os.path.join(HERE, "client.py"), what, addr[0], str(addr[1]), str(n)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"client {what} {addr}: exit {p.returncode}: {out}")
    return json.loads(out), ru.ru_utime + ru.ru_stime


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def transfer(stack, what):
    target = "source" if what == "down" else "sink"
    procs = stack.measured
    for p in procs:
        p.settle()
    c0 = [p.cpu() for p in procs]
    m0 = machine_busy_seconds()
    out, client_cpu = run_client(what, stack.entry[target], BYTES)
    for p in procs:
        p.settle()
    m1 = machine_busy_seconds()
    cpu = {}  # by name: the socats of one hop (one per target port) add up
    for p, before in zip(procs, c0):
        cpu[p.name] = cpu.get(p.name, 0.0) + p.cpu() - before
    cpu["client"] = client_cpu
    return {"seconds": out["seconds"], "bytes": out["bytes"], "cpu": cpu, "machine": m1 - m0}


def summarize_transfers(runs):
    gb = sum(r["bytes"] for r in runs) / 1e9
    names = list(runs[0]["cpu"])
    return {
        "gbit_s": statistics.median(r["bytes"] * 8 / r["seconds"] / 1e9 for r in runs),
        "gbit_s_all": [r["bytes"] * 8 / r["seconds"] / 1e9 for r in runs],
        "cpu_s_per_gb": {n: sum(r["cpu"][n] for r in runs) / gb for n in names},
        "machine_cpu_s_per_gb": sum(r["machine"] for r in runs) / gb,
        "runs": runs,
    }


def latency(stack, what, target, n):
    out, _ = run_client(what, stack.entry[target], n)
    ms = out["ms"]
    return {"p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "count": len(ms)}


def idle_memory(make, count):
    """Fresh processes; RSS of each ringfwd (and containerd) process before and after
    `count` idle connections through it."""
    stack = make()
    try:
        run_client("first", stack.entry["greet"], 1)  # first connection: sessions up
        time.sleep(1)
        procs = [p for p in stack.measured if p.name.startswith(("ringfwd", "containerd"))]
        before = {p.name: rss_kib(p.pid) for p in procs}
        fds0 = {p.name: len(os.listdir(f"/proc/{p.pid}/fd")) for p in procs}
        argv = [sys.executable, os.path.join(HERE, "client.py"), "hold"]
        argv += [stack.entry["greet"][0], str(stack.entry["greet"][1]), str(count)]
        holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = holder.stdout.readline()
        if not line:
            holder.wait()
            raise RuntimeError(f"hold client failed (exit {holder.returncode})")
        held = json.loads(line)
        time.sleep(1)
        after = {p.name: rss_kib(p.pid) for p in procs}
        fds1 = {p.name: len(os.listdir(f"/proc/{p.pid}/fd")) for p in procs}
        threads = {p.name: len(os.listdir(f"/proc/{p.pid}/task")) for p in procs}
        holder.stdin.close()
        holder.wait(60)
        return {
            "connections": held["held"],
            "open_seconds": held["seconds"],
            "rss_kib_before": before,
            "rss_kib_after": after,
            "kib_per_conn": {n: (after[n] - before[n]) / held["held"] for n in before},
            "fds_per_conn": {n: (fds1[n] - fds0[n]) / held["held"] for n in before},
            "threads_held": threads,
        }
    finally:
        stack.stop()


def measure(name, make, idle):
    """`idle`: how many idle connections to hold for the memory figure (0: none)."""
    load = loadavg()
    log(f"{name}: starting (load {load})")
    stack = make()
    row = {"name": name, "load_at_start": load, "processes": [[p.name, getattr(p, "argv", p.pid)] for p in stack.measured]}
    try:
        # Warm-up: sessions set up, first allocations done, before anything is timed.
        run_client("down", stack.entry["source"], 64 << 20)
        run_client("up", stack.entry["sink"], 64 << 20)
        for what in ["down", "up"]:
            row[what] = []
        for i in range(REPEATS):
            for what in ["down", "up"]:
                r = transfer(stack, what)
                row[what].append(r)
                log(f"{name}: {what} {r['bytes'] * 8 / r['seconds'] / 1e9:.2f} Gbit/s")
        row["down"] = summarize_transfers(row["down"])
        row["up"] = summarize_transfers(row["up"])
        row["first_byte"] = latency(stack, "first", "greet", CONNECTS)
        row["echo"] = latency(stack, "echo", "echo", ECHOES)
        log(f"{name}: first byte p50 {row['first_byte']['p50_ms']:.3f} ms, echo p50 {row['echo']['p50_ms']:.3f} ms")
    finally:
        stack.stop()
    if idle > 0:
        try:
            row["idle"] = idle_memory(make, idle)
            log(f"{name}: idle {row['idle']['kib_per_conn']}")
        except Exception as e:  # noqa: BLE001 - keep the row's other figures
            log(f"{name}: idle connections FAILED: {e}")
            row["idle"] = {"error": str(e), "connections": idle}
    return row


# ---------------------------------------------------------------------------------------------
# containerd


def containerd_wanted():
    if CONTAINERD == "0":
        return False, "CONTAINERD=0"
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    if not any(os.access(os.path.join(d, "containerd"), os.X_OK) for d in os.environ["PATH"].split(":")):
        reasons.append("no containerd in PATH")
    if reasons:
        if CONTAINERD == "1":
            sys.exit(f"CONTAINERD=1 but {', '.join(reasons)}")
        return False, ", ".join(reasons)
    return True, ""


def start_pod():
    """The forward test's hold_sandbox trial: a private containerd and a pod sandbox, kept
    until its stdin closes. Our targets run inside the pod's network namespace."""
    # FIXTURE_BIN: an already built `forward` test binary (target/release/deps/forward-*), to
    # skip the build.
    fixture = os.environ.get("FIXTURE_BIN")
    argv = [fixture] if fixture else ["cargo", "test", "--release", "--locked", "--test", "forward", "--"]
    argv += ["--ignored", "--nocapture", "--exact", "containerd::manual::hold_sandbox"]
    log("containerd: building and starting the fixture (" + " ".join(argv) + ")")
    hold = Proc("containerd fixture", argv, stdin=subprocess.PIPE)
    m = hold.wait_line(r"^HOLD (.*)$", timeout=3600)
    kv = dict(x.split("=", 1) for x in m.group(1).split())
    netns = kv["netns"]
    ip = kv.get("ip") or pod_ip(netns)
    pid = int(kv["containerd_pid"]) if "containerd_pid" in kv else containerd_pid(kv["endpoint"])
    target, ports = start_targets("0.0.0.0", netns)
    log(f"containerd: pid {pid}, sandbox {kv['sandbox'][:12]}, pod ip {ip}, targets {ports}")
    return {
        "hold": hold,
        "endpoint": kv["endpoint"],
        "sandbox": kv["sandbox"],
        "netns": netns,
        "ip": ip,
        "containerd": Shared("containerd", pid),
        "target": Shared("target", target.pid),
        "target_proc": target,
        "ports": ports,
    }


def pod_ip(netns):
    out = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True, text=True, check=True,
    ).stdout
    return re.search(r"inet ([\d.]+)/", out).group(1)


def containerd_pid(endpoint):
    """The containerd whose config sits next to its socket (the fixture's layout)."""
    d = os.path.dirname(endpoint.removeprefix("unix://"))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
        except OSError:
            continue
        if os.path.basename(cmd[0]) == "containerd" and any(a.startswith(d) for a in cmd):
            return int(pid)
    raise RuntimeError(f"no containerd process for {endpoint}")


def stop_pod(pod):
    pod["target_proc"].stop()
    try:
        pod["hold"].p.stdin.close()
        pod["hold"].p.wait(120)
    except (OSError, subprocess.TimeoutExpired):
        pod["hold"].stop()


# ---------------------------------------------------------------------------------------------
# Report


def machine():
    model = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        "?",
    )
    mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))

    def run(*a):
        try:
            return subprocess.run(a, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return "?"

    dirty = run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": os.uname().release,
        "commit": run("git", "rev-parse", "--short", "HEAD") + ("-dirty" if dirty else ""),
        "ringfwd": run(RINGFWD, "--version"),
        "socat": (run("socat", "-V").splitlines() + ["?", "?"])[1],  # "?" when absent
        "containerd": run("containerd", "--version"),
        "python": sys.version.split()[0],
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def cpu_cell(d, keep):
    parts = [f"{n} {v:.2f}" for n, v in d.items() if keep(n)]
    return ", ".join(parts) if parts else "-"


def is_load(n):
    return n in ("client", "target")


def render(info, rows, cmd, load0, load1, started, seconds):
    out = [f"# ringfwd perf/compare.sh, {started}\n"]
    out.append(
        f"Machine: {info['host']}, {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, "
        f"kernel {info['kernel']}. Commit {info['commit']} ({info['ringfwd']}); {info['socat']}; "
        f"{info['containerd']}; Python {info['python']}. Open files limit {info['nofile']}.\n"
    )
    out.append(
        f"Load average (1, 5, 15 min) at start: {load0}; at the end: {load1} (the idle-connection "
        "tests end with thousands of connections, and containerd threads, closing at once: "
        "the last row's own teardown can inflate this figure). The 1-minute load at the start "
        f"of each row is in the last column. Run time {seconds / 60:.1f} min.\n"
    )
    out.append("Command:\n\n```sh\n" + cmd + "\n```\n")
    out.append(
        f"{BYTES / 2**30:g} GiB per transfer, median of {REPEATS}; CPU is seconds per GB "
        "(1e9 bytes) per process on the path, summed over the repeats; \"machine\" is the busy "
        "time of all CPUs (everything running, not only the path); first byte over "
        f"{CONNECTS} new connections, echo over {ECHOES} round trips; memory with "
        f"{IDLE_CONNS} idle connections on fresh processes.\n"
    )
    out.append(
        "| path | down Gbit/s | up Gbit/s | CPU s/GB down | CPU s/GB up | machine CPU s/GB "
        "down / up | first byte p50 / p99 ms | 1-byte echo p50 / p99 ms | RSS per idle conn | load |"
    )
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error'].splitlines()[0][:120]} ||||||||| ")
            continue
        d, u = r["down"], r["up"]
        idle = "-"
        if "idle" in r and "error" in r["idle"]:
            idle = f"failed with {r['idle']['connections']}: {r['idle']['error'][:80]}"
        elif "idle" in r:
            idle = ", ".join(f"{n} {v:.1f} KiB" for n, v in r["idle"]["kib_per_conn"].items())
            if r["idle"]["connections"] != IDLE_CONNS:
                idle += f" ({r['idle']['connections']} conns)"
        out.append(
            f"| {r['name']} | {d['gbit_s']:.2f} | {u['gbit_s']:.2f} "
            f"| {cpu_cell(d['cpu_s_per_gb'], lambda n: not is_load(n))} "
            f"| {cpu_cell(u['cpu_s_per_gb'], lambda n: not is_load(n))} "
            f"| {d['machine_cpu_s_per_gb']:.2f} / {u['machine_cpu_s_per_gb']:.2f} "
            f"| {r['first_byte']['p50_ms']:.3f} / {r['first_byte']['p99_ms']:.3f} "
            f"| {r['echo']['p50_ms']:.3f} / {r['echo']['p99_ms']:.3f} | {idle} "
            f"| {r['load_at_start'].split()[0]} |"
        )
    out.append(
        "\nThe load generator's own CPU, s/GB down / up (perf/client.py is a fresh Python process "
        "per transfer, its start-up included; perf/targets.py runs for the whole row):\n"
    )
    out.append("| path | client | target |")
    out.append("| --- | --- | --- |")
    for r in rows:
        if "error" in r:
            continue
        c = [f"{r['down']['cpu_s_per_gb'].get(n, 0):.2f} / {r['up']['cpu_s_per_gb'].get(n, 0):.2f}"
             for n in ("client", "target")]
        out.append(f"| {r['name']} | {c[0]} | {c[1]} |")
    direct = next((r for r in rows if r["name"] == "direct" and "error" not in r), None)
    relayed = [r for r in rows if r["name"] != "direct" and "pod IP" not in r["name"] and "error" not in r]
    if direct and relayed:
        best = max(max(r["down"]["gbit_s"], r["up"]["gbit_s"]) for r in relayed)
        worst_direct = min(direct["down"]["gbit_s"], direct["up"]["gbit_s"])
        out.append(
            f"\nLoad generator check: direct {worst_direct:.2f} Gbit/s (slower direction) vs "
            f"the fastest relayed direction {best:.2f} Gbit/s"
            + (" (the client and targets are not the bottleneck)." if worst_direct > 1.5 * best
               else ": WARNING, the load generator may limit the relayed rows.")
        )
    out.append("\n## Raw\n\n```json")
    out.append(json.dumps({"machine": info, "command": cmd, "rows": rows}, indent=1))
    out.append("```\n")
    return "\n".join(out)


def wait_for_load():
    limit = os.environ.get("WAIT_FOR_LOAD")
    if not limit:
        return
    deadline = time.monotonic() + 1800
    while float(open("/proc/loadavg").read().split()[0]) > float(limit):
        if time.monotonic() > deadline:
            log(f"load still above {limit} after 30 min; running anyway")
            return
        log(f"waiting for the 1-min load average to drop below {limit}: {open('/proc/loadavg').read().strip()}")
        time.sleep(30)


def main():
    cmd = os.environ.get("COMPARE_CMD") or " ".join(map(shlex.quote, sys.argv))
    knobs = [f"{k}={shlex.quote(os.environ[k])}" for k in KNOBS if k in os.environ]
    cmd = " ".join(knobs + [cmd])
    if not os.access(RINGFWD, os.X_OK):
        sys.exit(f"no ringfwd binary at {RINGFWD} (cargo build --release, or set RINGFWD_BIN)")
    wait_for_load()
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    load0 = loadavg()
    metrics_modes = {"off": [False], "on": [True], "both": [False, True]}[METRICS]

    def tag(name, metrics, dp):
        name = f"{name} [{dp}]"
        return name + (" (metrics on)" if metrics else "") if METRICS != "off" else name

    plan = [
        ("direct", path_direct(local_targets), 0),
        (f"socat -b {SOCAT_BUF}", path_socat(local_targets, 1), 0),
        (f"2 chained socat -b {SOCAT_BUF}", path_socat(local_targets, 2), 0),
    ]
    for dp in DATA_PLANES:
        for m in metrics_modes:
            plan.append((tag("ringfwd forward + ringfwd serve", m, dp),
                         path_ringfwd_serve(local_targets, m, dp), IDLE_CONNS))
    pod = None
    want, why = containerd_wanted()
    if want:
        try:
            pod = start_pod()
        except Exception as e:  # noqa: BLE001 - reported in the results, the rest still runs
            log(f"containerd: fixture failed: {e}")
            why = f"fixture failed: {e}"
    if pod:
        def pod_targets(stack):
            stack.add(pod["target"])
            return pod["ip"], pod["ports"]

        plan.append(("direct to pod IP", path_direct(pod_targets), 0))
        plan.append((f"socat -b {SOCAT_BUF} to pod IP", path_socat(pod_targets, 1), 0))
        for dp in DATA_PLANES:
            for m in metrics_modes:
                plan.append((tag("ringfwd forward via containerd", m, dp),
                             path_ringfwd_cri(pod_targets, pod, m, dp), IDLE_CONNS_CRI))
    else:
        log(f"containerd rows skipped: {why}")
    if ROWS:
        plan = [p for p in plan if any(r in p[0] for r in ROWS)]
    rows = []
    try:
        for name, make, idle in plan:
            try:
                rows.append(measure(name, make, idle))
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                log(f"{name}: FAILED: {e}")
                rows.append({"name": name, "error": str(e)})
    finally:
        if pod:
            stop_pod(pod)
    load1 = loadavg()
    info = machine()
    if not pod:
        info["containerd_rows"] = f"skipped: {why}"
    text = render(info, rows, cmd, load0, load1, started.strftime("%Y-%m-%d %H:%M UTC"),
                  time.monotonic() - t0)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    base = os.path.join(HERE, "results", f"{started:%Y-%m-%d}-{info['host']}")
    path = base + ".md"
    if os.path.exists(path):
        path = f"{base}-{started:%H%M}.md"
    with open(path, "w") as f:
        f.write(text)
    print(text[: text.index("\n## Raw")])
    log(f"wrote {os.path.relpath(path, REPO)} (process logs in {LOGDIR})")


if __name__ == "__main__":
    main()
