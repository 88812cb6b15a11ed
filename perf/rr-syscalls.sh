#!/usr/bin/env bash
# perf/rr-syscalls.sh: where a request's cost goes, per data plane. Runs the embedded
# `ringfwd bench --connections N --message BYTES` (load generator and echo target in the bench
# process, `ringfwd forward` and `ringfwd serve` as its children) under a whole-machine
# `perf stat`, and prints system calls and context switches per request answered, for the
# whole machine (the bench's own load generator and echo target included: compare planes
# with each other, not with other tools).
# Usage (root, linux-perf installed): perf/rr-syscalls.sh [RINGFWD_BIN] [PLANES] [N] [BYTES] [SECONDS]
set -euo pipefail
bin=${1:-target/release/ringfwd}
planes=${2:-epoll,uring}
n=${3:-16}; bytes=${4:-64}; secs=${5:-5}
printf '%-6s %10s %14s %14s %12s\n' plane requests/s syscalls/req ctxsw/req fwd_us/req
for plane in ${planes//,/ }; do
  out=$(mktemp)
  perf stat -a -x, -e raw_syscalls:sys_enter,context-switches -o "$out.stat" -- \
    "$bin" bench --data-plane "$plane" --connections "$n" --message "$bytes" \
    --duration "${secs}s" --json > "$out"
  python3 - "$plane" "$out" "$out.stat" <<'PY'
import json, sys
plane, out, stat = sys.argv[1:]
r = json.load(open(out))
reqs = r["requests"]
ev = {}
for l in open(stat):
    f = l.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        ev[f[2]] = float(f[0])
fwd = next((c.get("us_per_request") for c in r.get("cpu", []) if c.get("role") == "forwarder"), None)
print(f"{plane:<6} {r['requests_per_second']:10.0f} {ev['raw_syscalls:sys_enter']/reqs:14.2f} {ev['context-switches']/reqs:14.2f} {fwd:12.1f}")
PY
  rm -f "$out" "$out.stat"
done
