"""Send N bytes to the test fixture's sink target through 127.0.0.1:PORT; print seconds.
The sink answers with the sha256 of what it received; exits non-zero if that differs."""
import hashlib, socket, struct, sys, time

port, n = int(sys.argv[1]), int(sys.argv[2])
chunk = bytes(range(256)) * 4096  # 1 MiB
s = socket.create_connection(("127.0.0.1", port))
t0 = time.perf_counter()
s.sendall(struct.pack("<Q", n))
h, left = hashlib.sha256(), n
while left > 0:
    b = chunk[: min(left, len(chunk))]
    s.sendall(b)
    h.update(b)
    left -= len(b)
theirs = b""
while len(theirs) < 32:
    k = s.recv(32 - len(theirs))
    if not k:
        break
    theirs += k
t = time.perf_counter() - t0
if theirs != h.digest():
    sys.exit(f"sink's sha256 {theirs.hex()} differs from ours {h.hexdigest()}")
print(f"{t:.3f}")
