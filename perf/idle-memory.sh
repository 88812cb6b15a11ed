#!/usr/bin/env bash
# Resident memory per idle connection of `ringfwd serve` and of a `ringfwd forward --url` to it,
# for one or more ringfwd binaries:
#
#   perf/idle-memory.sh [-n CONNS] target/release/ringfwd /tmp/ringfwd-old
#
# For each binary: a greet target (perf/targets.py: one byte on accept, then silence), `BIN
# serve` on loopback, `BIN forward` to it; one connection first (sessions up), then CONNS
# connections (default 10,000) opened, greeted and held idle by perf/client.py. Prints the RSS
# of both processes before and after, per connection. Needs an open-files limit above CONNS.
set -euo pipefail
cd "$(dirname "$0")/.."
n=10000
if [ "${1:-}" = -n ]; then n=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [-n CONNS] RINGFWD_BIN [RINGFWD_BIN ...]" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
wait_for() { until grep -q "$1" "$2"; do sleep 0.1; done; }

python3 perf/targets.py >"$work/targets.json" & pids+=($!)
until [ -s "$work/targets.json" ]; do sleep 0.1; done
greet=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['greet'])" "$work/targets.json")

for bin in "$@"; do
  rm -f "$work/serve.out" "$work/fwd.out"
  touch "$work/serve.out" "$work/fwd.out"
  "$bin" serve --listen 127.0.0.1:0 >"$work/serve.out" 2>&1 & serve=$!; pids+=($serve)
  wait_for Serving "$work/serve.out"
  url=$(grep -o 'http://[^ ]*' "$work/serve.out")
  "$bin" forward -q --url "$url" --address 127.0.0.1 ":$greet" >"$work/fwd.out" 2>&1 & fwd=$!; pids+=($fwd)
  wait_for Forwarding "$work/fwd.out"
  port=$(grep -o '127.0.0.1:[0-9]*' "$work/fwd.out" | head -1 | cut -d: -f2)
  python3 perf/client.py first 127.0.0.1 "$port" 1 >/dev/null
  sleep 1  # let the first connection's session settle: a measurement, not synchronisation
  f0=$(rss $fwd); s0=$(rss $serve)
  rm -f "$work/hold.in" "$work/hold.out"; mkfifo "$work/hold.in"
  sleep 3600 >"$work/hold.in" & holdopen=$!; pids+=($holdopen)
  python3 perf/client.py hold 127.0.0.1 "$port" "$n" <"$work/hold.in" >"$work/hold.out" &
  until [ -s "$work/hold.out" ]; do sleep 0.2; done
  sleep 1
  f1=$(rss $fwd); s1=$(rss $serve)
  python3 - "$bin" "$n" "$f0" "$f1" "$s0" "$s1" "$(cat "$work/hold.out")" <<'PY'
import json, sys
bin, n, f0, f1, s0, s1, held = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7]), sys.argv[7]
print(json.dumps({"binary": bin, "connections": json.loads(held)["held"],
                  "forward_kib": [f0, f1], "forward_kib_per_conn": round((f1 - f0) / n, 2),
                  "serve_kib": [s0, s1], "serve_kib_per_conn": round((s1 - s0) / n, 2)}))
PY
  kill "$holdopen"; kill -INT "$fwd"; wait "$fwd" 2>/dev/null || true
  kill -INT "$serve"; wait "$serve" 2>/dev/null || true
done
