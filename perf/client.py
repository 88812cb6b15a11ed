"""Load generator for perf/compare.py; talks to perf/targets.py through whatever is in between.
Prints one JSON line with what it measured. Run by compare.py, one process per measurement, so
that its CPU time is its own (compare.py reads it with wait4).

    client.py down  HOST PORT BYTES     # from the source target: seconds
    client.py up    HOST PORT BYTES     # to the sink target, until it answers: seconds
    client.py first HOST PORT COUNT     # new connection until the greet byte: ms each
    client.py echo  HOST PORT COUNT     # 1-byte round trips on one connection: ms each
    client.py hold  HOST PORT COUNT     # open COUNT greeted connections, print, wait for stdin
"""

import json
import selectors
import socket
import struct
import sys
import time

CHUNK = 1 << 20


def connect(host, port):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            sys.exit(f"end of file after {len(b)} of {n} bytes")
        b += k
    return b


def down(host, port, n):
    t0 = time.perf_counter()
    s = connect(host, port)
    s.sendall(struct.pack("<Q", n))
    buf = bytearray(CHUNK)
    got = 0
    while got < n:
        k = s.recv_into(buf)
        if k == 0:
            sys.exit(f"down: end of file after {got} of {n} bytes")
        got += k
    t = time.perf_counter() - t0
    s.close()
    return {"seconds": t, "bytes": got}


def up(host, port, n):
    view = memoryview(bytes(range(256)) * (CHUNK // 256))
    t0 = time.perf_counter()
    s = connect(host, port)
    s.sendall(struct.pack("<Q", n))
    left = n
    while left > 0:
        k = min(left, CHUNK)
        s.sendall(view[:k])
        left -= k
    got = struct.unpack("<Q", recv_exact(s, 8))[0]
    t = time.perf_counter() - t0
    s.close()
    if got != n:
        sys.exit(f"up: the sink got {got} of {n} bytes")
    return {"seconds": t, "bytes": n}


def first(host, port, count):
    ms = []
    for _ in range(count):
        t0 = time.perf_counter()
        s = connect(host, port)
        recv_exact(s, 1)
        ms.append((time.perf_counter() - t0) * 1e3)
        s.close()
    return {"ms": ms}


def echo(host, port, count):
    s = connect(host, port)
    for _ in range(20):  # warm-up: connection setup, first allocations along the path
        s.sendall(b"x")
        recv_exact(s, 1)
    ms = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendall(b"x")
        recv_exact(s, 1)
        ms.append((time.perf_counter() - t0) * 1e3)
    s.close()
    return {"ms": ms}


def hold(host, port, count, batch=256):
    """Open `count` connections, `batch` in flight, each done once its greet byte arrived."""
    sel = selectors.DefaultSelector()
    held, pending, opened = [], 0, 0
    t0 = time.perf_counter()
    while len(held) < count:
        while opened < count and pending < batch:
            s = connect(host, port)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            opened += 1
            pending += 1
        for key, _ in sel.select(timeout=30):
            s = key.fileobj
            sel.unregister(s)
            if s.recv(1) != b"!":
                sys.exit(f"hold: connection {len(held)} closed before its greet byte")
            held.append(s)
            pending -= 1
        if time.perf_counter() - t0 > 600:
            sys.exit(f"hold: only {len(held)} of {count} connections after 600 s")
    print(
        json.dumps({"held": len(held), "seconds": time.perf_counter() - t0}), flush=True
    )
    sys.stdin.read()  # hold until the caller closes our stdin
    for s in held:
        s.close()
    return None


def main():
    what, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    out = {"down": down, "up": up, "first": first, "echo": echo, "hold": hold}[what](
        host, port, n
    )
    if out is not None:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
