"""Ask the test fixture's source target for N bytes through 127.0.0.1:PORT; print seconds.
Exits non-zero if fewer bytes arrive than asked for."""
import socket, struct, sys, time

port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
t0 = time.perf_counter()
s.sendall(struct.pack("<Q", n))
got, buf = 0, bytearray(1 << 20)
while True:
    k = s.recv_into(buf)
    if k == 0:
        break
    got += k
t = time.perf_counter() - t0
if got != n:
    sys.exit(f"got {got} of {n} bytes")
print(f"{t:.3f}")
