#!/usr/bin/env bash
# What metrics cost: `ringfwd bench` (embedded, loopback) with metrics off and on, alternating in
# one run. "on" is `--metrics-addr 127.0.0.1:0` with a scraper fetching /metrics every second
# for the whole run; "off" installs no recorder (its scraper finds nothing to fetch). Each round runs both, in alternating order, so
# drift on a shared machine hits both sides alike.
#
# Usage: perf/metrics-cost.sh [ROUNDS] [BYTES]   (default 6 rounds of 1GiB each way)
#        CONTROL=1 perf/metrics-cost.sh ...     (A/A: the "on" slot also runs without metrics,
#                                                to see the noise floor of this machine)
# Needs: cargo build --release; curl; /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-6}
bytes=${2:-1GiB}
bin=target/release/ringfwd
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "machine: $(nproc) CPUs, Linux $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
echo "command: $bin bench --bytes $bytes [--metrics-addr 127.0.0.1:0]; curl every 1s in both modes"
[ -n "${CONTROL:-}" ] && echo "CONTROL: metrics off in both slots (A/A)"
echo

run() { # run MODE: prints "MODE DOWN UP CPU_DOWN CPU_UP USER SYS" (Gbit/s, client s/GB, process s)
    local mode=$1 args=() pid addr
    [ "$mode" = on ] && [ -z "${CONTROL:-}" ] && args=(--metrics-addr 127.0.0.1:0)
    RUST_LOG=off /usr/bin/time -f "process CPU %U user %S sys" -o "$tmp/time" \
        "$bin" bench --bytes "$bytes" "${args[@]}" >"$tmp/out" 2>/dev/null &
    pid=$!
    # Both modes run the same scraper loop, so the machine carries the same extra processes;
    # with metrics off it knocks on a closed port.
    addr=http://127.0.0.1:9/metrics
    if [ ${#args[@]} -gt 0 ]; then
        addr=
        while [ -z "$addr" ] && kill -0 "$pid" 2>/dev/null; do
            addr=$(sed -n 's/^Metrics on //p' "$tmp/out")
            sleep 0.05
        done
    fi
    while kill -0 "$pid" 2>/dev/null; do
        curl -s -o /dev/null "$addr" || true
        sleep 1
    done
    wait "$pid"
    awk -v mode="$mode" '
        /^download throughput/ { down = $3 }
        /^upload throughput/ { up = $3 }
        /^client CPU per GB/ { cd = $5; cu = $8 }
        /^process CPU/ { us = $3; sy = $5 }
        END { print mode, down, up, cd, cu, us, sy }' "$tmp/out" "$tmp/time"
}

for i in $(seq "$rounds"); do
    if [ $((i % 2)) = 1 ]; then order="off on"; else order="on off"; fi
    for mode in $order; do
        r=$(run "$mode")
        echo "round $i: $r" | awk '{printf "round %s %-3s download %5.2f Gbit/s  upload %5.2f Gbit/s  client CPU %.2f / %.2f s/GB  process %.2f user %.2f sys\n", $2, $3, $4, $5, $6, $7, $8, $9}'
        echo "$r" >>"$tmp/all"
    done
done

echo
awk '
function median(a, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ n[$1]++; for (f = 2; f <= 7; f++) v[$1, f, n[$1]] = $f }
END {
    split("download Gbit/s,upload Gbit/s,client CPU s/GB down,client CPU s/GB up,process user CPU s,process sys CPU s", name, ",")
    printf "%-26s %8s %8s %8s\n", "median of " n["off"] " runs", "off", "on", "on/off"
    for (f = 2; f <= 7; f++) {
        for (m in n) { for (i = 1; i <= n[m]; i++) x[i] = v[m, f, i]; med[m] = median(x, n[m]) }
        rel = med["off"] > 0 ? (med["on"] / med["off"] - 1) * 100 : 0
        printf "%-26s %8.3f %8.3f %+7.1f%%\n", name[f - 1], med["off"], med["on"], rel
    }
}' "$tmp/all"
