#!/usr/bin/env bash
# Download BYTES through `kubectl port-forward` and through `ringfwd`, over the WebSocket tunnel
# and over plain SPDY, from the source target of the kubectl test fixture (and, given SINK_PORT,
# upload BYTES to its sink target), and print wall time, throughput and the forwarding client's
# CPU seconds per GB.
#
#   cargo build --release
#   cargo test --test kubectl -- --ignored --nocapture manual::hold_api_server   # prints KC and ports
#   perf/api-compare.sh KUBECONFIG SOURCE_PORT [BYTES] [RINGFWD_BIN] [SINK_PORT]
set -euo pipefail
kc=$1 src=$2 bytes=${3:-1073741824} ringfwd=${4:-target/release/ringfwd} sink=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime+stime, clock ticks
tck=$(getconf CLK_TCK)

run() { # tool mode direction target-port script
  local tool=$1 mode=$2 dir=$3 target=$4 script=$5 out pid port
  out=$(mktemp)
  local env=()
  [ "$mode" = spdy ] && env=(KUBECTL_PORT_FORWARD_WEBSOCKETS=false)
  if [ "$tool" = kubectl ]; then
    env "${env[@]}" kubectl --kubeconfig "$kc" port-forward --address 127.0.0.1 pod/web ":$target" >"$out" 2>&1 &
  else
    env "${env[@]}" "$ringfwd" --kubeconfig "$kc" --address 127.0.0.1 pod/web ":$target" >"$out" 2>&1 &
  fi
  pid=$!
  until grep -q "Forwarding from" "$out"; do
    kill -0 "$pid" 2>/dev/null || { cat "$out"; return 1; }
    sleep 0.1
  done
  # kubectl is a version dispatcher: measure the process that holds the listening socket.
  port=$(sed -n 's/.*127.0.0.1:\([0-9]*\) .*/\1/p' "$out" | head -1)
  local lpid
  lpid=$(ss -Htlnp "sport = :$port" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)
  local c0 t
  c0=$(cpu "$lpid")
  t=$(python3 "$here/$script" "$port" "$bytes")
  local c1
  c1=$(cpu "$lpid")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 - "$tool" "$mode $dir" "$bytes" "$t" "$c0" "$c1" "$tck" <<'PY'
import sys
tool, mode, n, t, c0, c1, tck = sys.argv[1:]
n, t = int(n), float(t)
cpu = (int(c1) - int(c0)) / int(tck)
print(f"{tool:8} {mode:14} {n/2**20:8.0f} MiB {t:7.2f} s {n*8/t/1e9:6.2f} Gbit/s  client CPU {cpu/(n/1e9):5.2f} s/GB")
PY
  rm -f "$out"
}

for tool in kubectl ringfwd; do
  for mode in tunnel spdy; do
    run "$tool" "$mode" down "$src" download.py
    if [ -n "$sink" ]; then run "$tool" "$mode" up "$sink" upload.py; fi
  done
done
