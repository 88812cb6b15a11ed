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
#   crictl port-forward via containerd  the same with client-go's port-forward client
#                                    (CRICTL_BIN; the row is skipped, with a line, without it)
# With BASELINE_BIN, every ringfwd row runs a second time with that build (an earlier commit),
# side by side in the same invocation, and each figure of the new rows shows its ratio to it.
# For each: throughput down and up, CPU seconds per GB of every process on the path (and of
# the whole machine), new-connection first byte p50/p99, 1-byte echo round trip p50/p99, and
# for ringfwd paths the resident memory per connection with 10,000 idle connections open;
# request/response (many connections, small messages): `ringfwd bench --connections 16
# --message 64 --echo-addr` through the path, and `pgbench -S -c 16 -j 2 -T 10` against
# Debian's PostgreSQL 15 (one on loopback beside serve, one in the pod's network namespace):
# requests (transactions) per second, and CPU microseconds per request of the forwarder, the
# server (containerd or serve) and the whole machine. Whole-machine CPU per GB and per request
# through containerd head the report.
# The bulk client and targets are perf/client.py and perf/targets.py, the request/response
# ones `LOAD_BIN bench --connections` and `LOAD_BIN bench --targets-only`; perf/compare.py has
# the details of each measurement.
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
#   BASELINE_BIN=path               a build of an earlier commit, measured beside it (ratios);
#                                   a build without --data-plane (from before c748f59, e.g.
#                                   3d8e3a9) gives one row per path
#   BASELINE_NAME=3d8e3a9           its label (default: the commit of the git work tree that
#                                   holds BASELINE_BIN)
#   CRICTL_BIN=path                 crictl (cri-tools), for the client-go row through containerd
#   LOAD_BIN=$RINGFWD_BIN           the request/response load generator and echo target (a
#                                   ringfwd with `bench --connections`)
#   PARTS=bulk,rr,pgbench           what to measure: bulk transfers and latency (and idle
#                                   memory), bench --connections, pgbench
#   RR_CONNECTIONS=16 RR_MESSAGE=64 RR_SECONDS=10 RR_REPEATS=3
#                                   the request/response runs (median of the repeats)
#   PGBENCH_CLIENTS=16 PGBENCH_JOBS=2 PGBENCH_SECONDS=10 PGBENCH_REPEATS=3 PGBENCH_SCALE=10
#                                   the pgbench runs (-c, -j, -T; pgbench -i -s at start)
#   PG_BIN=/usr/lib/postgresql/15/bin  PostgreSQL's programs (postgres, initdb, pgbench,
#                                   pg_isready); pgbench rows are skipped without them
#   REGRESSION_TOLERANCE=0.05       the report lists every figure of a new row worse than the
#                                   baseline's by more than this
#   FIXTURE_BIN=path                an already built `forward` test binary (the containerd
#                                   fixture), to skip `cargo test --release --test forward`
# Output: perf/results/DATE-HOST.md (tables, machine, commits, this command, raw JSON).
# Needs python3, socat; for containerd also root, containerd, nsenter, the CNI plugins; for
# pgbench root (the server runs as user postgres through runuser) and postgresql-15.
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
