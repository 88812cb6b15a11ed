"""Targets for perf/compare.py: four TCP listeners on ADDR:0, ports printed as one JSON line.

    python3 perf/targets.py [--bind 127.0.0.1]
    nsenter --net=/var/run/netns/POD python3 perf/targets.py --bind 0.0.0.0   # inside a pod

- source: read a u64 LE count, send that many bytes (1 MiB sendall of one preallocated
  buffer), close.
- sink: read a u64 LE count, read that many bytes (recv_into one 1 MiB buffer), answer the
  count as u64 LE, close.
- echo: send back everything (one thread per connection).
- greet: send one byte on accept, then hold the connection until the client closes it. All
  greet connections live on one selector thread, so 10,000 idle ones cost no threads; it is
  also what "new connection first byte" times (no thread start on the path).

The count-first framing is the one `ringfwd bench` uses: containerd never passes a half-close
on to the pod, so a target cannot wait for end of file.
"""

import argparse
import json
import selectors
import socket
import struct
import threading

CHUNK = 1 << 20
PATTERN = bytes((i * 2654435761 >> 24) & 0xFF for i in range(CHUNK))


def read_count(s):
    b = b""
    while len(b) < 8:
        k = s.recv(8 - len(b))
        if not k:
            raise EOFError
        b += k
    return struct.unpack("<Q", b)[0]


def source(s):
    n = read_count(s)
    view = memoryview(PATTERN)
    while n > 0:
        k = min(n, CHUNK)
        s.sendall(view[:k])
        n -= k


def sink(s):
    n = read_count(s)
    buf = bytearray(CHUNK)
    got = 0
    while got < n:
        k = s.recv_into(buf, min(CHUNK, n - got))
        if k == 0:
            break
        got += k
    s.sendall(struct.pack("<Q", got))


def echo(s):
    buf = bytearray(65536)
    while True:
        k = s.recv_into(buf)
        if k == 0:
            return
        s.sendall(memoryview(buf)[:k])


def serve_threads(listener, handler):
    def run(s):
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler(s)
        except (OSError, EOFError):
            pass
        finally:
            s.close()

    while True:
        s, _ = listener.accept()
        threading.Thread(target=run, args=(s,), daemon=True).start()


def serve_greet(listener):
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is listener:
                while True:
                    try:
                        c, _ = listener.accept()
                    except BlockingIOError:
                        break
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        c.send(b"!")
                    except OSError:
                        c.close()
                        continue
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                continue
            try:
                more = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                more = b""
            if not more:
                sel.unregister(s)
                s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="127.0.0.1")
    a = ap.parse_args()
    ports = {}
    for name, run in [
        ("source", lambda l: serve_threads(l, source)),
        ("sink", lambda l: serve_threads(l, sink)),
        ("echo", lambda l: serve_threads(l, echo)),
        ("greet", serve_greet),
    ]:
        l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        l.bind((a.bind, 0))
        l.listen(4096)
        ports[name] = l.getsockname()[1]
        threading.Thread(target=run, args=(l,), daemon=True).start()
    print(json.dumps(ports), flush=True)
    threading.Event().wait()  # until killed

if __name__ == "__main__":
    main()
