#!/usr/bin/env bash
# perf/compare.sh: ringfwd against plain relays on this machine, in one invocation.
#
# Measures, on loopback, one row per path:
#   direct                           client -> target (the ceiling)
#   socat -b 131072                  client -> socat -> target
#   2 chained socat -b 131072        client -> socat -> socat -> target
#   ringfwd forward + ringfwd serve  client -> ringfwd forward --url -> ringfwd serve -> target
#                                    (once per data plane: [epoll] splices, [copy] copies)
# and, run as root with containerd installed (a private containerd and pod sandbox from the
# forward test's hold_sandbox trial, targets inside the pod's network namespace):
#   direct to pod IP, socat -b 131072 to pod IP,
#   ringfwd forward via containerd   client -> ringfwd forward --runtime-endpoint -> containerd's
#                                    CRI stream server -> target in the pod
# For each: throughput down and up, CPU seconds per GB of every process on the path (and of
# the whole machine), new-connection first byte p50/p99, 1-byte echo round trip p50/p99, and
# for ringfwd paths the resident memory per connection with 10,000 idle connections open.
# The client and targets are perf/client.py and perf/targets.py; perf/compare.py has the
# details of each measurement.
#
# Run (from anywhere; builds target/profiling/ringfwd, the release code with symbols for
# `perf record`, unless RINGFWD_BIN is set):
#   perf/compare.sh
# Knobs (environment):
#   BYTES=1073741824 REPEATS=3      bytes per transfer, transfers per direction (median shown)
#   CONNECTS=200 ECHOES=2000        new connections / echo round trips to time
#   IDLE_CONNS=10000                idle connections for the memory figure (0: skip)
#   IDLE_CONNS_CRI=4000             the same through containerd (it needs 4 descriptors and an
#                                   OS thread per connection: 10,000 exceed a 20k fd limit)
#   CONTAINERD=auto|0|1             the containerd rows: when possible / never / required
#   ROWS=socat,serve                only rows whose name contains one of these
#   DATA_PLANES=epoll,copy          ringfwd's --data-plane values, one row each
#   RINGFWD_METRICS=off|on|both     ringfwd rows without / with / both with and without the
#                                   metrics endpoint: RINGFWD_METRICS_ARGS (default
#                                   "--metrics-addr 127.0.0.1:0") goes to `ringfwd forward`,
#                                   RINGFWD_SERVE_METRICS_ARGS to `ringfwd serve`
#   WAIT_FOR_LOAD=0.5               first wait (up to 30 min) for the 1-min load average
#   RINGFWD_BIN=path                the ringfwd binary to measure
# Output: perf/results/DATE-HOST.md (table, machine, commit, this command, raw JSON).
# Needs python3, socat; for containerd also root, containerd, nsenter, the CNI plugins.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
export COMPARE_CMD="perf/compare.sh${*:+ $*}"
# 10,000 connections held through two relays: every process needs well over 10k descriptors.
want=65536
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$want" ]; then
  ulimit -Hn "$want" 2>/dev/null || want=$(ulimit -Hn)
fi
ulimit -n "$want"
if [ -z "${RINGFWD_BIN:-}" ]; then
  cargo build --profile profiling --locked --bin ringfwd
  export RINGFWD_BIN=target/profiling/ringfwd
fi
exec python3 "$here/compare.py" "$@"
