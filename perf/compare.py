"""The body of perf/compare.sh (run that; its header documents the knobs).

Sets up each path on loopback, measures it with perf/client.py against perf/targets.py, and
writes perf/results/DATE-HOST.md: markdown tables plus every raw figure as JSON.

Rows come in two groups, loopback and through containerd's pod; all stacks of a group run at
once and every repeat measures each row in turn (the baseline build's rows next to the new
ones), so a drifting machine shifts every row alike and a change that makes a row worse shows in
the same run.

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
  open, on freshly started ringfwd processes: (VmRSS after - VmRSS before) / IDLE_CONNS;
- request/response: `LOAD_BIN bench --connections RR_CONNECTIONS --message RR_MESSAGE
  --echo-addr` (many connections, small messages) against the echo of `LOAD_BIN bench
  --targets-only`, RR_SECONDS each, RR_REPEATS times: requests per second (median), latency,
  and CPU microseconds per request of each process, from /proc around the whole client run
  (its 16 connects and 160 warm-up requests included, under 0.2% of a run) divided by the
  requests of the timed window;
- `pgbench -S -c PGBENCH_CLIENTS -j PGBENCH_JOBS -T PGBENCH_SECONDS` against Debian's
  PostgreSQL (one instance on loopback beside `serve`, one in the pod's network namespace):
  transactions per second (median) and CPU microseconds per transaction the same way
  (PostgreSQL's backends are reaped children of the postmaster: counted once they exit).
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
import shutil
import signal

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
# A build of an earlier commit: its rows run next to RINGFWD's, and every figure of a new row
# shows its ratio to the baseline's.
BASELINE = os.environ.get("BASELINE_BIN", "")
# The load generator and request/response targets (`bench --connections`, `--targets-only`).
LOAD_BIN = os.environ.get("LOAD_BIN", RINGFWD)
CRICTL = os.environ.get("CRICTL_BIN", "")
PARTS = [p for p in os.environ.get("PARTS", "bulk,rr,pgbench").split(",") if p]
RR_CONNECTIONS = env_int("RR_CONNECTIONS", 16)
RR_MESSAGE = env_int("RR_MESSAGE", 64)
RR_SECONDS = env_int("RR_SECONDS", 10)
RR_REPEATS = env_int("RR_REPEATS", 3)
PGBENCH_CLIENTS = env_int("PGBENCH_CLIENTS", 16)
PGBENCH_JOBS = env_int("PGBENCH_JOBS", 2)
PGBENCH_SECONDS = env_int("PGBENCH_SECONDS", 10)
PGBENCH_REPEATS = env_int("PGBENCH_REPEATS", 3)
PGBENCH_SCALE = env_int("PGBENCH_SCALE", 10)
PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
TOLERANCE = float(os.environ.get("REGRESSION_TOLERANCE", "0.05"))
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
    "BASELINE_BIN",
    "BASELINE_NAME",
    "LOAD_BIN",
    "CRICTL_BIN",
    "PARTS",
    "RR_CONNECTIONS",
    "RR_MESSAGE",
    "RR_SECONDS",
    "RR_REPEATS",
    "PGBENCH_CLIENTS",
    "PGBENCH_JOBS",
    "PGBENCH_SECONDS",
    "PGBENCH_REPEATS",
    "PGBENCH_SCALE",
    "PG_BIN",
    "REGRESSION_TOLERANCE",
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


def data_plane_args(dp):
    """`--data-plane DP`, or nothing for a build from before the flag (dp None)."""
    return ["--data-plane", dp] if dp else []


def forwarding_ports(p, remotes):
    """{remote: local} from kubectl-style `Forwarding from 127.0.0.1:L -> R` lines."""
    local = {}
    while len(local) < len(set(remotes)):
        m = p.wait_line(r"Forwarding from [\d.]+:(\d+) -> (\d+)")
        local[int(m.group(2))] = int(m.group(1))
    return local


def ringfwd_forward(upstream, remotes, metrics, dp, binary=RINGFWD):
    argv = [binary, "forward"] + data_plane_args(dp) + upstream + ["--address", LOCAL]
    argv += [f":{r}" for r in remotes] + (METRICS_ARGS if metrics else [])
    p = Proc("ringfwd forward", argv)
    return p, forwarding_ports(p, remotes)


def ringfwd_serve(metrics, dp, binary=RINGFWD):
    argv = [binary, "serve"] + data_plane_args(dp) + ["--listen", f"{LOCAL}:0"]
    p = Proc("ringfwd serve", argv + (SERVE_METRICS_ARGS if metrics else []))
    return p, p.wait_line(r"Serving port-forward on (\S+)").group(1)


def crictl_forward(pod, remotes):
    """client-go's port-forward client (crictl) straight to containerd's stream server."""
    argv = [CRICTL, "--runtime-endpoint", pod["endpoint"], "port-forward", pod["sandbox"]]
    p = Proc("crictl port-forward", argv + [f":{r}" for r in remotes])
    return p, forwarding_ports(p, remotes)


def start_rr_target(bind=LOCAL, netns=None):
    """`LOAD_BIN bench --targets-only`: a Rust echo for the request/response rows (a Python
    echo would be the bottleneck at tens of thousands of requests per second)."""
    argv = [LOAD_BIN, "bench", "--targets-only", "--targets-bind", bind]
    if netns:
        argv = ["nsenter", f"--net={netns}"] + argv
    p = Proc("rr target", argv)
    return p, json.loads(p.wait_line(r"^\{.*\}$").group(0))["echo"]


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
        s.entry = {k: (host, t[k]) for k in t}

    return path(targets_at, build)


def path_socat(targets_at, hops):
    def build(s, host, t):
        for k in t:
            dest = (host, t[k])
            for hop in range(hops, 0, -1):  # the hop nearest the target starts first
                p, port = socat("socat" if hops == 1 else f"socat {hop}", *dest)
                s.add(p)
                dest = (LOCAL, port)
            s.entry[k] = dest

    return path(targets_at, build)


def path_ringfwd_serve(targets_at, metrics, dp, binary=RINGFWD):
    def build(s, _host, t):
        serve, url = ringfwd_serve(metrics, dp, binary)
        s.add(serve)
        fwd, local = ringfwd_forward(["--url", url], list(t.values()), metrics, dp, binary)
        s.add(fwd)
        s.entry = {k: (LOCAL, local[t[k]]) for k in t}

    return path(targets_at, build)


def path_ringfwd_cri(targets_at, pod, metrics, dp, binary=RINGFWD):
    def build(s, _host, t):
        upstream = ["--runtime-endpoint", pod["endpoint"], pod["sandbox"]]
        fwd, local = ringfwd_forward(upstream, list(t.values()), metrics, dp, binary)
        s.add(fwd)
        s.add(pod["containerd"])
        s.entry = {k: (LOCAL, local[t[k]]) for k in t}

    return path(targets_at, build)


def path_crictl(targets_at, pod):
    def build(s, _host, t):
        fwd, local = crictl_forward(pod, list(t.values()))
        s.add(fwd)
        s.add(pod["containerd"])
        s.entry = {k: (LOCAL, local[t[k]]) for k in t}

    return path(targets_at, build)


class Shared:
    """A process the harness keeps across rows (containerd, the pod's target): stop is a no-op.
    With `children`, reaped children's CPU counts too, and settle waits until no more children
    live than at the start (PostgreSQL's backends: their CPU reaches the postmaster's
    cutime/cstime once they are reaped)."""

    def __init__(self, name, pid, children=False):
        self.name, self.pid, self.children = name, pid, children
        self.resident = live_children(pid) if children else 0

    def cpu(self):
        return cpu_seconds(self.pid, self.children)

    def settle(self):
        deadline = time.monotonic() + 10
        while self.children and live_children(self.pid) > self.resident:
            if time.monotonic() > deadline:
                log(f"{self.name}: children still running after 10 s")
                return
            time.sleep(0.02)

    def stop(self):
        pass


# Shared targets beside perf/targets.py: {"rr": (Shared, port), "postgres": (Shared, port)}
# on loopback, and the same inside the pod.
EXTRA_TARGETS = {"local": {}, "pod": {}}


def with_extra(stack, where, ports):
    """Add the shared request/response targets of `where` to the stack's targets."""
    ports = dict(ports)
    for name, (proc, port) in EXTRA_TARGETS[where].items():
        stack.add(proc)
        ports[name] = port
    return ports


def local_targets(stack):
    p, ports = start_targets()
    stack.add(p)
    return LOCAL, with_extra(stack, "local", ports)


# ---------------------------------------------------------------------------------------------
# Measuring


def run_load(argv, timeout=600):
    """Run a load generator to its end; returns (its stdout, its CPU seconds from wait4)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    timer.cancel()
    reader.join(5)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        msg = " ".join((out + "".join(err)).split())[-400:]
        raise RuntimeError(f"{os.path.basename(argv[0])}: exit {p.returncode}: {msg}")
    return out, ru.ru_utime + ru.ru_stime


def run_client(what, addr, n, timeout=600):
    """Run client.py; returns (its JSON, its CPU seconds)."""
    argv = [sys.executable, os.path.join(HERE, "client.py"), what, addr[0], str(addr[1]), str(n)]
    out, cpu = run_load(argv, timeout)
    return json.loads(out), cpu


def around(stack, load):
    """CPU of every measured process and of the machine around `load()` (which returns
    (result, client CPU seconds)); children reaped before and after."""
    procs = stack.measured
    for p in procs:
        p.settle()
    c0 = [p.cpu() for p in procs]
    m0 = machine_busy_seconds()
    out, client_cpu = load()
    for p in procs:
        p.settle()
    m1 = machine_busy_seconds()
    cpu = {}  # by name: the socats of one hop (one per target port) add up
    for p, before in zip(procs, c0):
        cpu[p.name] = cpu.get(p.name, 0.0) + p.cpu() - before
    cpu["client"] = client_cpu
    return out, cpu, m1 - m0


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def transfer(stack, what):
    target = "source" if what == "down" else "sink"
    out, cpu, machine = around(stack, lambda: run_client(what, stack.entry[target], BYTES))
    return {"seconds": out["seconds"], "bytes": out["bytes"], "cpu": cpu, "machine": machine}


def rr_run(stack):
    """One `bench --connections` run against the path's request/response echo."""
    host, port = stack.entry["rr"]
    argv = [LOAD_BIN, "bench", "--connections", str(RR_CONNECTIONS), "--message", str(RR_MESSAGE),
            "--duration", f"{RR_SECONDS}s", "--echo-addr", f"{host}:{port}", "--json"]
    out, cpu, machine = around(stack, lambda: run_load(argv, RR_SECONDS + 120))
    rep = json.loads(out)
    return {"requests": rep["requests"], "seconds": rep["seconds"],
            "rate": rep["requests_per_second"], "latency_ms": rep["latency_ms"],
            "cpu": cpu, "machine": machine}


def pgbench_run(stack):
    """One `pgbench -S` run (select-only, held connections) against the path's PostgreSQL."""
    host, port = stack.entry["postgres"]
    argv = [os.path.join(PG_BIN, "pgbench"), "-n", "-S", "-c", str(PGBENCH_CLIENTS),
            "-j", str(PGBENCH_JOBS), "-T", str(PGBENCH_SECONDS), "-h", host, "-p", str(port),
            "-U", "postgres", "postgres"]
    out, cpu, machine = around(stack, lambda: run_load(argv, PGBENCH_SECONDS + 120))
    n = re.search(r"number of transactions actually processed: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not (n and tps):
        raise RuntimeError(f"pgbench printed no result: {out[-400:]}")
    if failed and int(failed.group(1)):
        raise RuntimeError(f"pgbench: {failed.group(1)} failed transactions")
    return {"requests": int(n.group(1)), "seconds": PGBENCH_SECONDS, "rate": float(tps.group(1)),
            "cpu": cpu, "machine": machine}


def summarize_requests(runs):
    """Median rate; CPU microseconds per request summed over the runs."""
    n = sum(r["requests"] for r in runs)
    names = list(runs[0]["cpu"])
    out = {
        "rate": statistics.median(r["rate"] for r in runs),
        "rate_all": [r["rate"] for r in runs],
        "cpu_us_per_request": {k: sum(r["cpu"][k] for r in runs) / n * 1e6 for k in names},
        "machine_us_per_request": sum(r["machine"] for r in runs) / n * 1e6,
        "runs": runs,
    }
    if "latency_ms" in runs[0]:
        out["latency_ms"] = {q: statistics.median(r["latency_ms"][q] for r in runs)
                             for q in ("p50", "p99")}
    return out


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
        errlog = os.path.join(LOGDIR, f"hold-{time.time_ns()}.log")
        holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  stderr=open(errlog, "w"))
        line = holder.stdout.readline()
        if not line:
            holder.wait()
            last = (open(errlog).read().strip().splitlines() or ["no error output"])[-1]
            # What the relay said first (a session limit, a refused accept) explains it.
            said = [f"{p.name}: {w.split(None, 2)[-1].strip()}" for p in procs
                    if getattr(p, "log", None)
                    for w in [next((x for x in open(p.log) if " WARN " in x or " ERROR " in x), "")]
                    if w]
            raise RuntimeError(f"hold client failed (exit {holder.returncode}): {last}"
                               + (f"; {'; '.join(said)}" if said else "") + f" (logs in {LOGDIR})")
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


class Row:
    """One path measured with one build: `make` builds fresh stacks; `baseline` names the row
    of the baseline build on the same path (for ratios)."""

    def __init__(self, name, make, idle, baseline=None, is_baseline=False):
        self.name, self.make, self.idle = name, make, idle
        self.baseline, self.stack = baseline, None
        self.data = {"name": name}
        if baseline:
            self.data["baseline"] = baseline
        if is_baseline:
            self.data["is_baseline"] = True

    def fail(self, part, e):
        log(f"{self.name}: {part} FAILED: {e}")
        self.data.setdefault("errors", {})[part] = str(e)
        if self.stack:
            self.stack.stop()
            self.stack = None


def measure_group(rows, parts):
    """Every row's stack up at once; each repeat measures every row in turn."""
    live = []
    for r in rows:
        r.data["load_at_start"] = loadavg()
        log(f"{r.name}: starting (load {r.data['load_at_start']})")
        try:
            r.stack = r.make()
            r.data["processes"] = [[p.name, getattr(p, "argv", p.pid)] for p in r.stack.measured]
            live.append(r)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            r.fail("start", e)

    def each(part, fn):
        for r in list(live):
            try:
                fn(r)
            except Exception as e:  # noqa: BLE001 - as above
                r.fail(part, e)
                live.remove(r)

    def repeat(part, times, run, summarize, show):
        for r in live:
            r.data[part] = []
        for _ in range(times):
            def one(r):
                x = run(r.stack)
                x["load"] = loadavg().split()[0]
                r.data[part].append(x)
                log(f"{r.name}: {part} {show(x)}")
            each(part, one)
        each(part, lambda r: r.data.__setitem__(part, summarize(r.data[part])))

    try:
        if "bulk" in parts:
            def warm(r):
                # Sessions set up, first allocations done, before anything is timed.
                run_client("down", r.stack.entry["source"], 64 << 20)
                run_client("up", r.stack.entry["sink"], 64 << 20)
            each("bulk", warm)
            for r in live:
                r.data["down"], r.data["up"] = [], []
            for _ in range(REPEATS):
                def both(r):
                    for what in ["down", "up"]:
                        x = transfer(r.stack, what)
                        r.data[what].append(x)
                        log(f"{r.name}: {what} {x['bytes'] * 8 / x['seconds'] / 1e9:.2f} Gbit/s")
                each("bulk", both)

            def latencies(r):
                r.data["down"] = summarize_transfers(r.data["down"])
                r.data["up"] = summarize_transfers(r.data["up"])
                r.data["first_byte"] = latency(r.stack, "first", "greet", CONNECTS)
                r.data["echo"] = latency(r.stack, "echo", "echo", ECHOES)
                log(f"{r.name}: first byte p50 {r.data['first_byte']['p50_ms']:.3f} ms, "
                    f"echo p50 {r.data['echo']['p50_ms']:.3f} ms")
            each("bulk", latencies)
        if "rr" in parts:
            repeat("rr", RR_REPEATS, rr_run, summarize_requests,
                   lambda x: f"{x['rate']:.0f} requests/s, p50 {x['latency_ms']['p50']:.3f} ms")
        if "pgbench" in parts:
            repeat("pgbench", PGBENCH_REPEATS, pgbench_run, summarize_requests,
                   lambda x: f"{x['rate']:.0f} tps")
    finally:
        for r in live:
            r.stack.stop()
            r.stack = None
    for r in rows:
        if r.idle > 0 and "bulk" in parts and "errors" not in r.data:
            try:
                r.data["idle"] = idle_memory(r.make, r.idle)
                log(f"{r.name}: idle {r.data['idle']['kib_per_conn']}")
            except Exception as e:  # noqa: BLE001 - keep the row's other figures
                log(f"{r.name}: idle connections FAILED: {e}")
                r.data["idle"] = {"error": str(e), "connections": r.idle}
    return [r.data for r in rows]


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def free_port():
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


class Postgres:
    """Debian's PostgreSQL in a fresh directory, run as user postgres (it refuses root), inside
    `netns` when given, with pgbench's tables loaded."""

    def __init__(self, name, listen, port, netns=None):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="ringfwd-compare-pg-")
        shutil.chown(self.dir, "postgres", "postgres")
        data = os.path.join(self.dir, "data")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(as_pg + [os.path.join(PG_BIN, "initdb"), "-D", data, "-A", "trust",
                                "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)
        with open(os.path.join(data, "pg_hba.conf"), "a") as f:
            f.write("host all all 0.0.0.0/0 trust\n")  # the pod IP's clients
        argv = as_pg + [os.path.join(PG_BIN, "postgres"), "-D", data, "-p", str(port),
                        "-k", self.dir, "-c", f"listen_addresses={listen}",
                        "-c", "autovacuum=off", "-c", "fsync=off"]
        if netns:
            argv = ["nsenter", f"--net={netns}"] + argv
        self.proc = Proc(name, argv)
        self.port = port
        deadline = time.monotonic() + 60
        ready = [os.path.join(PG_BIN, "pg_isready"), "-q", "-h", self.dir, "-p", str(port)]
        while subprocess.run(ready).returncode != 0:
            if time.monotonic() > deadline or self.proc.p.poll() is not None:
                raise RuntimeError(f"{name} did not start: {open(self.proc.log).read()[-1500:]}")
            time.sleep(0.2)
        subprocess.run([os.path.join(PG_BIN, "pgbench"), "-i", "-q", "-s", str(PGBENCH_SCALE),
                        "-h", self.dir, "-p", str(port), "-U", "postgres", "postgres"],
                       check=True, capture_output=True)
        with open(os.path.join(data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        self.shared = PgShared("postgres", self.pid)
        self.shared.settle()

    def stop(self):
        try:
            os.kill(self.pid, signal.SIGINT)  # fast shutdown
            self.proc.p.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PgShared(Shared):
    """The postmaster: its reaped backends' CPU counts; settle waits until no client backend
    (a child whose title names a client address) is left, and no child is a zombie: an exited
    backend's CPU reaches the postmaster's cutime/cstime only once it is reaped, and counted
    late it would land on the next row."""

    def __init__(self, name, pid):
        super().__init__(name, pid, children=True)

    def settle(self):
        deadline = time.monotonic() + 10
        while any(state == "Z" or re.search(r"\[local\]|\(\d+\)", title)
                  for state, title in child_states(self.pid)):
            if time.monotonic() > deadline:
                log("postgres: client backends still running after 10 s")
                return
            time.sleep(0.02)


def child_states(pid):
    """(state, title) of each child of `pid`; a zombie's title is empty."""
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                for c in f.read().split():
                    try:
                        with open(f"/proc/{c}/cmdline") as g:
                            title = g.read().replace("\0", " ")
                        state = stat_fields(c)[0]
                    except OSError:
                        continue  # gone (reaped) meanwhile
                    out.append((state, title))
    except FileNotFoundError:
        pass
    return out


def pgbench_wanted():
    missing = [b for b in ("postgres", "initdb", "pgbench", "pg_isready")
               if not os.access(os.path.join(PG_BIN, b), os.X_OK)]
    if missing:
        return False, f"no {', '.join(missing)} in PG_BIN={PG_BIN}"
    if os.geteuid() != 0:
        return False, "not root (the server runs as user postgres through runuser)"
    return True, ""


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


def git_commit(where):
    """The short commit of the git work tree holding `where` ("-dirty" if it has changes), or
    None outside one."""
    d = where if os.path.isdir(where) else os.path.dirname(os.path.abspath(where))
    try:
        head = subprocess.run(["git", "-C", d, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def has_data_plane_flag(binary):
    """Builds from before the data-plane work (3d8e3a9) have no --data-plane."""
    out = subprocess.run([binary, "forward", "--help"], capture_output=True, text=True).stdout
    return "--data-plane" in out


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

    info = {
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": os.uname().release,
        "commit": git_commit(REPO) or "?",
        "ringfwd": run(RINGFWD, "--version"),
        "ringfwd_bin": RINGFWD,
        "ringfwd_commit": git_commit(RINGFWD) or "?",
        "socat": (run("socat", "-V").splitlines() + ["?", "?"])[1],  # "?" when absent
        "containerd": run("containerd", "--version"),
        "python": sys.version.split()[0],
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    if BASELINE:
        info["baseline_bin"] = BASELINE
        info["baseline_commit"] = git_commit(BASELINE) or "?"
    if CRICTL:
        info["crictl"] = run(CRICTL, "--version")
    if "pgbench" in PARTS:
        info["postgres"] = run(os.path.join(PG_BIN, "postgres"), "--version")
    return info


def cpu_cell(d, keep, base=None, fmt="{:.2f}"):
    parts = []
    for n, v in d.items():
        if keep(n):
            b = base.get(n) if base else None
            parts.append(f"{n} {fig(v, b, fmt)}")
    return ", ".join(parts) if parts else "-"


LOAD = ("client", "target", "rr target", "postgres")
SERVERS = ("containerd", "ringfwd serve")


def is_load(n):
    return n in LOAD


def is_server(n):
    return n in SERVERS


def is_forwarder(n):
    return not is_load(n) and not is_server(n)


def fig(v, b, fmt="{:.2f}"):
    """A figure, and its ratio to the baseline's when there is one."""
    s = fmt.format(v)
    if b:
        s += f" ({v / b:.2f}x)"
    return s


def ok(r, part):
    return isinstance(r.get(part), dict)


def failed(r, part):
    errs = r.get("errors", {})
    e = errs.get(part) or errs.get("start")
    return e and f"| {r['name']} | failed: {' '.join(e.split())[:160]} |"


def role_sum(d, keep):
    return sum(v for n, v in d.items() if keep(n))


def render(info, rows, cmd, load0, load1, started, seconds, skipped):
    by_name = {r["name"]: r for r in rows}

    def base(r, part):
        b = by_name.get(r.get("baseline"))
        return b if b and ok(b, part) else None

    out = [f"# ringfwd perf/compare.sh, {started}\n"]
    out.append(
        f"Machine: {info['host']}, {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, "
        f"kernel {info['kernel']}. Scripts at {info['commit']}; ringfwd {info['ringfwd_bin']} "
        f"(commit {info['ringfwd_commit']}, {info['ringfwd']})"
        + (f"; baseline {info['baseline_bin']} (commit {info['baseline_commit']})"
           if BASELINE else "; no baseline (BASELINE_BIN unset)")
        + f"; {info['socat']}; {info['containerd']}"
        + (f"; {info['crictl']}" if CRICTL else "")
        + (f"; {info['postgres']}" if "postgres" in info else "")
        + f"; Python {info['python']}. Open files limit {info['nofile']}.\n"
    )
    out.append(
        f"Load average (1, 5, 15 min) at start: {load0}; at the end: {load1} (the idle-connection "
        "tests end with thousands of connections, and containerd threads, closing at once: "
        "the last row's own teardown can inflate this figure). The 1-minute load when each "
        f"row's stack started is in the last column. Run time {seconds / 60:.1f} min.\n"
    )
    out.append("Command:\n\n```sh\n" + cmd + "\n```\n")
    for line in skipped:
        out.append(f"Skipped: {line}\n")
    if BASELINE:
        out.append(
            "Rows of both builds ran side by side: every stack of a group (loopback, then "
            "containerd) was up at once and each repeat measured every row in turn. A figure "
            "followed by (R x) is R = this row / the baseline build's row on the same path "
            "(higher is better for rates, lower for CPU, latency and memory).\n"
        )

    # Headline: the whole machine's CPU through containerd.
    cri = [r for r in rows if r.get("group") == "containerd"]
    if cri:
        out.append("## Headline: whole-machine CPU through containerd\n")
        out.append(
            "Busy time of all CPUs (client, targets, everything on the path and anything else "
            "running) per GB moved and per request answered: on a machine where the runtime "
            "shares the cores, the figure that decides throughput.\n")
        out.append("| path | machine CPU s/GB down | machine CPU s/GB up | machine µs per request "
                   f"(bench, {RR_CONNECTIONS} conns) | machine µs per transaction (pgbench -S) |")
        out.append("| --- | --- | --- | --- | --- |")
        for r in cri:
            cells = []
            b = base(r, "down")
            for d in ("down", "up"):
                cells.append(fig(r[d]["machine_cpu_s_per_gb"], b and b[d]["machine_cpu_s_per_gb"])
                             if ok(r, d) else "-")
            for part in ("rr", "pgbench"):
                b = base(r, part)
                cells.append(fig(r[part]["machine_us_per_request"],
                                 b and b[part]["machine_us_per_request"], "{:.1f}")
                             if ok(r, part) else "-")
            out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        out.append("")

    if any(ok(r, "down") or "bulk" in r.get("errors", {}) for r in rows):
        out.append("## Bulk transfers and latency\n")
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
            if not ok(r, "down"):
                if failed(r, "bulk"):
                    out.append(failed(r, "bulk"))
                continue
            d, u = r["down"], r["up"]
            b = base(r, "down")
            bd, bu = (b["down"], b["up"]) if b else ({}, {})
            idle = "-"
            if "idle" in r and "error" in r["idle"]:
                idle = f"failed with {r['idle']['connections']}: {r['idle']['error'][:240]}"
            elif "idle" in r:
                bi = b and "idle" in b and "kib_per_conn" in b["idle"] and b["idle"]["kib_per_conn"]
                idle = ", ".join(f"{n} {fig(v, bi and bi.get(n), '{:.1f}')} KiB"
                                 for n, v in r["idle"]["kib_per_conn"].items())
                if r["idle"]["connections"] != IDLE_CONNS:
                    idle += f" ({r['idle']['connections']} conns)"
            lat = []
            for k in ("first_byte", "echo"):
                lat.append(" / ".join(fig(r[k][q], b and b[k][q], "{:.3f}")
                                      for q in ("p50_ms", "p99_ms")))
            out.append(
                f"| {r['name']} | {fig(d['gbit_s'], bd.get('gbit_s'))} "
                f"| {fig(u['gbit_s'], bu.get('gbit_s'))} "
                f"| {cpu_cell(d['cpu_s_per_gb'], is_forwarder_or_server, bd.get('cpu_s_per_gb'))} "
                f"| {cpu_cell(u['cpu_s_per_gb'], is_forwarder_or_server, bu.get('cpu_s_per_gb'))} "
                f"| {fig(d['machine_cpu_s_per_gb'], bd.get('machine_cpu_s_per_gb'))} / "
                f"{fig(u['machine_cpu_s_per_gb'], bu.get('machine_cpu_s_per_gb'))} "
                f"| {lat[0]} | {lat[1]} | {idle} "
                f"| {r['load_at_start'].split()[0]} |"
            )
        out.append(
            "\nThe load generator's own CPU, s/GB down / up (perf/client.py is a fresh Python process "
            "per transfer, its start-up included; perf/targets.py runs for the whole row):\n"
        )
        out.append("| path | client | target |")
        out.append("| --- | --- | --- |")
        for r in rows:
            if not ok(r, "down"):
                continue
            c = [f"{r['down']['cpu_s_per_gb'].get(n, 0):.2f} / {r['up']['cpu_s_per_gb'].get(n, 0):.2f}"
                 for n in ("client", "target")]
            out.append(f"| {r['name']} | {c[0]} | {c[1]} |")
        direct = next((r for r in rows if r["name"] == "direct" and ok(r, "down")), None)
        relayed = [r for r in rows if r["name"] != "direct" and "pod IP" not in r["name"]
                   and ok(r, "down")]
        if direct and relayed:
            best = max(max(r["down"]["gbit_s"], r["up"]["gbit_s"]) for r in relayed)
            worst_direct = min(direct["down"]["gbit_s"], direct["up"]["gbit_s"])
            out.append(
                f"\nLoad generator check: direct {worst_direct:.2f} Gbit/s (slower direction) vs "
                f"the fastest relayed direction {best:.2f} Gbit/s"
                + (" (the client and targets are not the bottleneck)." if worst_direct > 1.5 * best
                   else ": WARNING, the load generator may limit the relayed rows.")
            )
        out.append("")

    for part, title, unit, what in [
        ("rr", f"Request/response: `ringfwd bench --connections {RR_CONNECTIONS} --message "
               f"{RR_MESSAGE}`, {RR_SECONDS} s, median of {RR_REPEATS}", "request", "requests/s"),
        ("pgbench", f"`pgbench -S -c {PGBENCH_CLIENTS} -j {PGBENCH_JOBS} -T {PGBENCH_SECONDS}` "
                    f"(select-only, scale {PGBENCH_SCALE}), median of {PGBENCH_REPEATS}",
         "transaction", "tps"),
    ]:
        if not any(ok(r, part) or part in r.get("errors", {}) for r in rows):
            continue
        out.append(f"## {title}\n")
        out.append(
            f"CPU is microseconds per {unit}, summed over the repeats and divided by the "
            f"{unit}s answered; forwarder = what relays (ringfwd forward, socat, crictl), "
            "server = containerd or ringfwd serve; machine = all CPUs' busy time.\n")
        lat_head = " latency p50 / p99 ms |" if part == "rr" else ""
        out.append(f"| path | {what} |{lat_head} forwarder µs/{unit} | server µs/{unit} "
                   f"| machine µs/{unit} | load |")
        out.append("| --- | --- |" + (" --- |" if part == "rr" else "") + " --- | --- | --- | --- |")
        for r in rows:
            if not ok(r, part):
                if failed(r, part):
                    out.append(failed(r, part))
                continue
            x = r[part]
            b = base(r, part)
            bx = b[part] if b else {}
            bc = bx.get("cpu_us_per_request")
            lat = ""
            if part == "rr":
                lat = " " + " / ".join(fig(x["latency_ms"][q], b and bx["latency_ms"][q], "{:.3f}")
                                       for q in ("p50", "p99")) + " |"
            out.append(
                f"| {r['name']} | {fig(x['rate'], bx.get('rate'), '{:.0f}')} |{lat} "
                f"{cpu_cell(x['cpu_us_per_request'], is_forwarder, bc, '{:.1f}')} | "
                f"{cpu_cell(x['cpu_us_per_request'], is_server, bc, '{:.1f}')} | "
                f"{fig(x['machine_us_per_request'], bx.get('machine_us_per_request'), '{:.1f}')} | "
                f"{x['runs'][0]['load']} |")
        out.append(f"\nThe load generator's and the target's own CPU, µs per {unit}:\n")
        out.append("| path | client | target |")
        out.append("| --- | --- | --- |")
        for r in rows:
            if ok(r, part):
                c = r[part]["cpu_us_per_request"]
                served_by = "rr target" if part == "rr" else "postgres"
                tgt = cpu_cell(c, lambda n: n == served_by, fmt="{:.1f}")
                out.append(f"| {r['name']} | {c.get('client', 0):.1f} | {tgt} |")
        out.append("")

    checks = target_checks(rows)
    if checks:
        out.append("## Issue 20's targets, from this run\n")
        out.extend(f"- {c}" for c in checks)
        out.append("")
    out.append("\n## Raw\n\n```json")
    out.append(json.dumps({"machine": info, "command": cmd, "rows": rows}, indent=1))
    out.append("```\n")
    return "\n".join(out)


def is_forwarder_or_server(n):
    return not is_load(n)


def target_checks(rows):
    """Issue 20's ratios where this run has both sides (informative; nothing fails on them)."""
    by = {r["name"]: r for r in rows}
    out = []

    def rate(r, part):
        return r[part]["rate"] if r and ok(r, part) else None

    def us(r, part, keep):
        return role_sum(r[part]["cpu_us_per_request"], keep) if r and ok(r, part) else None

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    crictl = by.get("crictl port-forward via containerd")
    for r in rows:
        if r.get("group") != "containerd" or not r["name"].startswith("ringfwd"):
            continue
        for part, label in (("rr", "bench"), ("pgbench", "pgbench")):
            if crictl and ok(r, part) and ok(crictl, part):
                out.append(
                    f"{r['name']}, {label}: rate {ratio(rate(r, part), rate(crictl, part))} "
                    f"crictl's (target >= 1.5x), forwarder CPU per request "
                    f"{ratio(us(r, part, is_forwarder), us(crictl, part, is_forwarder))} "
                    f"(target <= 0.4x), containerd CPU per request "
                    f"{ratio(us(r, part, is_server), us(crictl, part, is_server))} (target <= 1.0x)")
    socat = by.get(f"socat -b {SOCAT_BUF}")
    for r in rows:
        if r["name"].startswith("ringfwd forward + ringfwd serve") and socat and ok(r, "pgbench") \
                and ok(socat, "pgbench"):
            out.append(f"{r['name']}: pgbench rate {ratio(rate(r, 'pgbench'), rate(socat, 'pgbench'))} "
                       "one socat relay's (target >= 1.0x)")
    for path in ("ringfwd forward + ringfwd serve", "ringfwd forward via containerd"):
        u, e = by.get(f"{path} [uring]"), by.get(f"{path} [epoll]")
        if not (u and e):
            continue
        for part in ("rr", "pgbench"):
            if ok(u, part) and ok(e, part):
                out.append(
                    f"{path}, {part}: uring/epoll rate {ratio(rate(u, part), rate(e, part))} "
                    f"(target >= 1.3x), forwarder CPU per request "
                    f"{ratio(us(u, part, is_forwarder), us(e, part, is_forwarder))} (target <= 0.7x)")
        if ok(u, "down") and ok(e, "down"):
            g = [ratio(u[d]["gbit_s"], e[d]["gbit_s"]) for d in ("down", "up")]
            m = [ratio(u[d]["machine_cpu_s_per_gb"], e[d]["machine_cpu_s_per_gb"])
                 for d in ("down", "up")]
            out.append(f"{path}, bulk: uring/epoll throughput {g[0]} down, {g[1]} up (target "
                       f">= 1.0x); machine CPU per GB {m[0]} down, {m[1]} up (target <= 1.0x)")
    worse = regressions(rows)
    if BASELINE:
        out.append(
            f"Worse than the baseline by more than {TOLERANCE:.0%} (repeat spread is in the raw "
            "JSON: `gbit_s_all`, `rate_all`): " + ("nothing" if not worse else "\n  - "
                                                   + "\n  - ".join(worse)))
    return out


# Per part: its rate (higher is better), and its machine and per-process CPU (lower is).
FIGURES = [
    ("down", "gbit_s", "machine_cpu_s_per_gb", "cpu_s_per_gb", "s/GB"),
    ("up", "gbit_s", "machine_cpu_s_per_gb", "cpu_s_per_gb", "s/GB"),
    ("rr", "rate", "machine_us_per_request", "cpu_us_per_request", "µs"),
    ("pgbench", "rate", "machine_us_per_request", "cpu_us_per_request", "µs"),
]


def regressions(rows):
    by = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        b = by.get(r.get("baseline"))
        if not b:
            continue

        def check(label, new, old, higher_better):
            if new is None or not old:
                return
            x = new / old
            if (x < 1 - TOLERANCE) if higher_better else (x > 1 + TOLERANCE):
                out.append(f"{r['name']} {label} {x:.2f}x")

        for part, rate, machine_key, cpu_key, unit in FIGURES:
            if ok(r, part) and ok(b, part):
                x, y = r[part], b[part]
                check(f"{part} {'Gbit/s' if rate == 'gbit_s' else 'rate'}", x[rate], y[rate], True)
                check(f"{part} machine {unit}", x[machine_key], y[machine_key], False)
                for n, v in x[cpu_key].items():
                    if not is_load(n):
                        check(f"{part} {n} {unit}", v, y[cpu_key].get(n), False)
    return out


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


def builds():
    """(label, binary, data planes): the build under test, then the baseline's."""
    out = [(None, RINGFWD, DATA_PLANES if has_data_plane_flag(RINGFWD) else [None])]
    if BASELINE:
        name = os.environ.get("BASELINE_NAME") or git_commit(BASELINE) or "baseline"
        out.append((name, BASELINE, DATA_PLANES if has_data_plane_flag(BASELINE) else [None]))
    return out


def ringfwd_rows(path_name, factory, group, idle):
    """A row per build, data plane and metrics mode on one ringfwd path; each new row names
    the baseline row of its data plane (or the baseline's only row, from before the flag)."""
    metrics_modes = {"off": [False], "on": [True], "both": [False, True]}[METRICS]

    def tag(dp, metrics, label):
        name = path_name + (f" [{dp}]" if dp else "") + (f" ({label})" if label else "")
        return name + (" (metrics on)" if metrics else "") if METRICS != "off" else name

    rows = []
    (_, new_bin, new_dps), *rest = builds()
    for label, binary, dps in rest:
        for dp in dps:
            for m in metrics_modes:
                rows.append(Row(tag(dp, m, label), factory(m, dp, binary), idle, is_baseline=True))
    baselines = {r.name: r for r in rows}
    new = []
    for dp in new_dps:
        for m in metrics_modes:
            b = next((n for n in (tag(dp, m, l) for l, _, _ in rest) if n in baselines), None) \
                or next((tag(None, m, l) for l, _, _ in rest if tag(None, m, l) in baselines), None)
            new.append(Row(tag(dp, m, None), factory(m, dp, new_bin), idle, baseline=b))
    out = new + rows
    for r in out:
        r.data["group"] = group
    return out


def main():
    cmd = os.environ.get("COMPARE_CMD") or " ".join(map(shlex.quote, sys.argv))
    knobs = [f"{k}={shlex.quote(os.environ[k])}" for k in KNOBS if k in os.environ]
    cmd = " ".join(knobs + [cmd])
    for name, b in (("RINGFWD_BIN", RINGFWD), ("BASELINE_BIN", BASELINE), ("LOAD_BIN", LOAD_BIN),
                    ("CRICTL_BIN", CRICTL)):
        if b and not os.access(b, os.X_OK):
            sys.exit(f"no executable at {name}={b}"
                     + (" (cargo build --release)" if name == "RINGFWD_BIN" else ""))
    wait_for_load()
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    load0 = loadavg()
    skipped = []
    parts = list(PARTS)
    if "rr" in parts and "--connections" not in subprocess.run(
            [LOAD_BIN, "bench", "--help"], capture_output=True, text=True).stdout:
        skipped.append(f"request/response rows: LOAD_BIN={LOAD_BIN} has no `bench --connections`")
        parts.remove("rr")
    if "pgbench" in parts:
        want_pg, why = pgbench_wanted()
        if not want_pg:
            skipped.append(f"pgbench rows: {why}")
            parts.remove("pgbench")
    pgs, rr_targets = [], []
    local = [
        Row("direct", path_direct(local_targets), 0),
        Row(f"socat -b {SOCAT_BUF}", path_socat(local_targets, 1), 0),
        Row(f"2 chained socat -b {SOCAT_BUF}", path_socat(local_targets, 2), 0),
    ]
    for r in local:
        r.data["group"] = "loopback"
    local += ringfwd_rows(
        "ringfwd forward + ringfwd serve",
        lambda m, dp, b: path_ringfwd_serve(local_targets, m, dp, b), "loopback", IDLE_CONNS)
    groups = [local]
    pod = None
    want, why = containerd_wanted()
    if want:
        try:
            pod = start_pod()
        except Exception as e:  # noqa: BLE001 - reported in the results, the rest still runs
            log(f"containerd: fixture failed: {e}")
            why = f"fixture failed: {e}"
    try:
        if "rr" in parts:
            p, port = start_rr_target()
            rr_targets.append(p)
            EXTRA_TARGETS["local"]["rr"] = (Shared("rr target", p.pid), port)
        if "pgbench" in parts:
            pg = Postgres("postgres (loopback)", LOCAL, free_port())
            pgs.append(pg)
            EXTRA_TARGETS["local"]["postgres"] = (pg.shared, pg.port)
        if pod:
            if "rr" in parts:
                p, port = start_rr_target("0.0.0.0", pod["netns"])
                rr_targets.append(p)
                EXTRA_TARGETS["pod"]["rr"] = (Shared("rr target", p.pid), port)
            if "pgbench" in parts:
                pg = Postgres("postgres (pod)", "*", 5432, pod["netns"])
                pgs.append(pg)
                EXTRA_TARGETS["pod"]["postgres"] = (pg.shared, pg.port)

            def pod_targets(stack):
                stack.add(pod["target"])
                return pod["ip"], with_extra(stack, "pod", pod["ports"])

            cri = [
                Row("direct to pod IP", path_direct(pod_targets), 0),
                Row(f"socat -b {SOCAT_BUF} to pod IP", path_socat(pod_targets, 1), 0),
            ]
            for r in cri:
                r.data["group"] = "containerd"
            cri += ringfwd_rows(
                "ringfwd forward via containerd",
                lambda m, dp, b: path_ringfwd_cri(pod_targets, pod, m, dp, b), "containerd",
                IDLE_CONNS_CRI)
            if CRICTL:
                r = Row("crictl port-forward via containerd", path_crictl(pod_targets, pod), 0)
                r.data["group"] = "containerd"
                cri.append(r)
            else:
                skipped.append("the crictl row (client-go's port-forward): CRICTL_BIN unset")
            groups.append(cri)
        else:
            skipped.append(f"containerd rows: {why}")
        for line in skipped:
            log(f"skipped: {line}")
        if ROWS:
            groups = [[r for r in g if any(x in r.name for x in ROWS)] for g in groups]
        rows = []
        for g in groups:
            if g:
                rows += measure_group(g, parts)
    finally:
        for p in rr_targets:
            p.stop()
        for pg in pgs:
            pg.stop()
        if pod:
            stop_pod(pod)
    load1 = loadavg()
    info = machine()
    text = render(info, rows, cmd, load0, load1, started.strftime("%Y-%m-%d %H:%M UTC"),
                  time.monotonic() - t0, skipped)
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
