#!/usr/bin/env python3
"""Where a 1-byte echo through a containerd forward waits, hop by hop, beside a bulk download.

usage: echo_hops.py ECHO_ADDR SOURCE_ADDR --netns PATH --echo-port P [--echoes 3000]

ECHO_ADDR and SOURCE_ADDR are a forward's local ports for the pod's echo server and endless
source (as in perf/isolation.py); --netns is the pod's network namespace and --echo-port the
echo server's port inside it. As root, with tcpdump. Captures small pushed TCP segments on the
host's loopback and on the pod's loopback while a download runs on SOURCE_ADDR and the echo
runs on ECHO_ADDR, then pairs, for every round trip, the timestamps of:

  1 client -> forward (1 byte)       2 forward -> runtime stream server (9-byte DATA frame)
  3 runtime -> echo server (in pod)  4 echo server -> runtime (in pod)
  5 runtime -> forward (the 1-byte payload of its DATA frame)
  6 forward -> client (1 byte)

and prints one JSON object: the round trip as the wire saw it, each hop (p50/p99 ms), the
forward's share (1->2 plus 5->6), the runtime and pod's share (2->5), and how many hop delays
fell in each half-millisecond bin above 0.5 ms.
"""
import argparse
import collections
import json
import os
import struct
import subprocess
import tempfile
import time

from isolation import addr, connect, echoes, start_bulk

# Data segments only, and small ones: the echo's, not the download's.
FILTER = "tcp and less 160 and (tcp[tcpflags] & tcp-push != 0)"


def capture(path, netns=None):
    # --immediate-mode: no packet waits in a half-filled ring block that exit would drop.
    cmd = ["tcpdump", "-i", "lo", "-n", "--immediate-mode", "--time-stamp-precision=nano",
           "-B", "32768", "-w", path, FILTER]
    if netns:
        cmd = ["nsenter", "--net=" + netns] + cmd
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # "listening on lo ...": the capture is armed
    if "listening" not in line:
        raise SystemExit("tcpdump did not start: " + line + p.stderr.read())
    return p


def segments(path):
    """(time, source port, destination port, payload length) of each IPv4 TCP segment."""
    data = open(path, "rb").read()
    if struct.unpack("<I", data[:4])[0] != 0xA1B23C4D:
        raise SystemExit(path + ": not a nanosecond pcap")
    off, out = 24, []
    while off + 16 <= len(data):
        sec, nsec, incl, _ = struct.unpack("<IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        ip = frame[14:]  # Ethernet header on lo
        ihl = (ip[0] & 15) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        out.append((sec + nsec / 1e9, sport, dport, total - ihl - (tcp[12] >> 4) * 4))
    return out


def round_trips(host, pod, local_port, echo_port):
    # The echo's session is the one connection that carries 9-byte frames (header + 1 byte).
    (sess, server), _ = collections.Counter(
        (a, b) for _, a, b, n in host if n == 9).most_common(1)[0]
    events = []
    for t, a, b, n in host:
        if b == local_port and n == 1:
            events.append((t, 1))
        elif (a, b, n) == (sess, server, 9):
            events.append((t, 2))
        elif (a, b) == (server, sess) and n in (1, 5, 9):  # payload, maybe with its header
            events.append((t, 5))
        elif a == local_port and n == 1:
            events.append((t, 6))
    for t, a, b, n in pod:
        if b == echo_port and n == 1:
            events.append((t, 3))
        elif a == echo_port and n == 1:
            events.append((t, 4))
    events.sort()
    trips, missing, cur = [], collections.Counter(), None
    for t, k in events:
        if k == 1:
            cur = {1: t}
        elif cur is not None:
            cur[k] = t
            if k == 6:
                if len(cur) == 6:
                    trips.append(cur)
                else:
                    missing[",".join(str(x) for x in range(1, 7) if x not in cur)] += 1
                cur = None
    return trips, missing


def pcts(xs):
    xs = sorted(xs)
    return {"p50_ms": round(xs[len(xs) // 2] * 1000, 3),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, 3)}


HOPS = {"forward_up": (1, 2), "runtime_up": (2, 3), "echo_server": (3, 4),
        "runtime_down": (4, 5), "forward_down": (5, 6)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("echo")
    ap.add_argument("source")
    ap.add_argument("--netns", required=True)
    ap.add_argument("--echo-port", type=int, required=True)
    ap.add_argument("--echoes", type=int, default=3000)
    a = ap.parse_args()
    echo, source = addr(a.echo), addr(a.source)
    work = tempfile.mkdtemp()
    host_pcap, pod_pcap = os.path.join(work, "host.pcap"), os.path.join(work, "pod.pcap")

    s = connect(echo)
    echoes(s, 200)  # warm up
    caps = [capture(host_pcap), capture(pod_pcap, a.netns)]
    stop, counter, dl = start_bulk(source)
    t0, c0 = time.perf_counter(), counter.value
    client = pcts(echoes(s, a.echoes))
    gbps = (counter.value - c0) * 8 / (time.perf_counter() - t0) / 1e9
    stop.set()
    dl.join()
    s.close()
    for p in caps:
        p.terminate()
        p.wait()

    trips, missing = round_trips(segments(host_pcap), segments(pod_pcap), echo[1], a.echo_port)
    bins = collections.Counter()
    for r in trips:
        for x, y in HOPS.values():
            d = (r[y] - r[x]) * 1000
            if d > 0.5:
                bins[str(int(d * 2) / 2)] += 1
    res = {
        "bulk_gbit_s": round(gbps, 2),
        "client": client,
        "round_trips": len(trips),
        "unpaired_by_missing_event": dict(missing),
        "wire": pcts([r[6] - r[1] for r in trips]),
        "hops": {k: pcts([r[y] - r[x] for r in trips]) for k, (x, y) in HOPS.items()},
        "forward_share": pcts([(r[2] - r[1]) + (r[6] - r[5]) for r in trips]),
        "runtime_and_pod_share": pcts([r[5] - r[2] for r in trips]),
        "hop_delays_over_0.5ms": dict(sorted(bins.items(), key=lambda kv: float(kv[0]))),
    }
    for f in (host_pcap, pod_pcap):
        os.unlink(f)
    os.rmdir(work)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
