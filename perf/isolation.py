#!/usr/bin/env python3
"""Isolation measurements against one forward (any tool that forwards two local ports).

usage: isolation.py ECHO_ADDR SOURCE_ADDR [--churn-rate 1000] [--churn-seconds 30]

ECHO_ADDR forwards to an echo server, SOURCE_ADDR to a target that streams bytes endlessly
(the forward test's hold_sandbox trial starts both in a pod). Prints one JSON object:
- echo_alone: 1-byte echo round trip on an open connection (p50/p99 ms, 2000 rounds);
- ttfb: new connection, 1 byte sent, first byte back (p50/p99 ms, 200 connections);
- beside_bulk: the same echo while another connection downloads as fast as it can;
- beside_stalled: the same echo (on a connection opened before) while another connection
  has stopped reading a download, plus 50 new connections during the stall;
- churn: connect, 2-byte echo, close, paced at --churn-rate per second for --churn-seconds,
  from 16 threads: how many worked, failed, and the rate reached.
"""
import argparse
import json
import multiprocessing
import socket
import threading
import time


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 3) if xs else None


def summary(xs):
    return {"p50_ms": pct(xs, 0.50), "p99_ms": pct(xs, 0.99), "n": len(xs)}


def connect(a, timeout=5.0):
    s = socket.create_connection(a, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def echoes(s, rounds):
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError("echo answered wrong")
        out.append(time.perf_counter() - t)
    return out


def ttfb(a, count):
    out, failed = [], 0
    for _ in range(count):
        t = time.perf_counter()
        try:
            s = connect(a)
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("echo answered wrong")
            out.append(time.perf_counter() - t)
            s.close()
        except OSError:
            failed += 1
    return out, failed


def bulk(a, stop, counter):
    # A process of its own: in a thread it would compete with the echo for the GIL.
    s = connect(a)
    s.sendall((1 << 62).to_bytes(8, "little"))
    buf = bytearray(1 << 20)
    while not stop.is_set():
        n = s.recv_into(buf)
        if n == 0:
            break
        with counter.get_lock():
            counter.value += n
    s.close()


def start_bulk(source):
    """Start a download from `source` in its own process and return once it runs at full
    speed: (stop event, byte counter, process)."""
    stop, counter = multiprocessing.Event(), multiprocessing.Value("Q", 0)
    proc = multiprocessing.Process(target=bulk, args=(source, stop, counter))
    proc.start()
    while counter.value < (64 << 20):
        time.sleep(0.01)  # wait for the download to run at full speed
    return stop, counter, proc


def churn(a, rate, seconds, threads=16):
    ok, failed, errors = [0], [0], []
    lock = threading.Lock()
    start = time.perf_counter() + 0.1
    total = int(rate * seconds)
    nxt = [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= total:
                return
            due = start + i / rate
            d = due - time.perf_counter()
            if d > 0:
                time.sleep(d)  # pacing the load, not synchronisation
            msg = (i & 0xFFFF).to_bytes(2, "little")
            try:
                s = connect(a)
                s.sendall(msg)
                got = b""
                while len(got) < 2:
                    b = s.recv(2 - len(got))
                    if not b:
                        raise OSError("end of file before the echo")
                    got += b
                if got != msg:
                    raise OSError("echo differs")
                s.close()
                with lock:
                    ok[0] += 1
            except OSError as e:
                with lock:
                    failed[0] += 1
                    if len(errors) < 5:
                        errors.append(str(e))

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.perf_counter() - start
    return {"ok": ok[0], "failed": failed[0], "seconds": round(took, 2),
            "rate_per_s": round(ok[0] / took, 1), "errors": errors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("echo")
    ap.add_argument("source")
    ap.add_argument("--churn-rate", type=float, default=1000)
    ap.add_argument("--churn-seconds", type=float, default=30)
    a = ap.parse_args()
    echo, source = addr(a.echo), addr(a.source)
    res = {}

    s = connect(echo)
    echoes(s, 200)  # warm up
    res["echo_alone"] = summary(echoes(s, 2000))
    t, f = ttfb(echo, 200)
    res["ttfb"] = dict(summary(t), failed=f)

    stop, counter, th = start_bulk(source)
    t0, c0 = time.perf_counter(), counter.value
    e = echoes(s, 2000)
    gbps = (counter.value - c0) * 8 / (time.perf_counter() - t0) / 1e9
    stop.set()
    th.join()
    res["beside_bulk"] = dict(summary(e), bulk_gbit_s=round(gbps, 2))

    stalled = connect(source)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    stalled.sendall((1 << 62).to_bytes(8, "little"))
    stalled.recv(1)
    time.sleep(2)  # let the download fill every buffer on its way: the stall is the scenario
    try:
        e = echoes(s, 2000)
        res["beside_stalled"] = summary(e)
    except OSError as err:
        res["beside_stalled"] = {"error": str(err)}
    t, f = ttfb(echo, 50)
    res["beside_stalled"]["new_conn"] = dict(summary(t), failed=f)
    stalled.close()
    s.close()

    if a.churn_seconds > 0:
        res["churn"] = churn(echo, a.churn_rate, a.churn_seconds)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
