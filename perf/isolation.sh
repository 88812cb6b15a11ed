#!/usr/bin/env bash
# Side by side through a real containerd pod: isolation, new-connection latency and churn for
# one or more ringfwd binaries (for example this build and an older one).
#
#   perf/isolation.sh target/release/ringfwd "target/release/ringfwd --max-sessions 1" /tmp/ringfwd-old
#
# Each argument is a binary, optionally followed by extra `forward` flags (one quoted word).
# As root. Starts the forward test's hold_sandbox trial (a private containerd, a pod sandbox, an
# echo server and an endless source inside the pod), runs `BIN forward --runtime-endpoint ...`
# for each binary in turn and measures it with perf/isolation.py. Prints one JSON line per
# binary. CHURN_RATE and CHURN_SECONDS (default 1000 and 30) set the churn phase.
# ECHO_HOPS=N (default 0) adds N runs of perf/echo_hops.py per binary (needs tcpdump): where an
# echo beside a bulk download waits, hop by hop. ISOLATION=0 skips perf/isolation.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 RINGFWD_BIN [RINGFWD_BIN ...]" >&2; exit 2; }

work=$(mktemp -d)
mkfifo "$work/hold.in"
cleanup() {
  [ -n "${fwd_pid:-}" ] && kill "$fwd_pid" 2>/dev/null || true
  exec 3>&- 2>/dev/null || true  # closing the fifo tears the sandbox down
  [ -n "${hold_pid:-}" ] && wait "$hold_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# FIXTURE_BIN: an already built `forward` test binary (target/release/deps/forward-*), to skip
# the build.
if [ -n "${FIXTURE_BIN:-}" ]; then
  fixture=("$FIXTURE_BIN")
else
  cargo test --release --locked --test forward --no-run 2>/dev/null
  fixture=(cargo test --release --locked --test forward --)
fi
"${fixture[@]}" --ignored --nocapture --exact \
  containerd::manual::hold_sandbox <"$work/hold.in" >"$work/hold.out" 2>&1 &
hold_pid=$!
exec 3>"$work/hold.in"
until grep -q '^ *HOLD ' "$work/hold.out"; do
  kill -0 "$hold_pid" 2>/dev/null || { cat "$work/hold.out" >&2; exit 1; }
  sleep 0.2
done
eval "$(grep '^ *HOLD ' "$work/hold.out" | sed 's/^ *HOLD //')"
echo "# sandbox $sandbox, echo :$echo, source :$source; $(nproc) cores, $(uname -r)" >&2

for spec in "$@"; do
  read -r bin extra <<<"$spec"
  # shellcheck disable=SC2086 # extra flags are meant to split
  "$bin" forward --runtime-endpoint "$endpoint" --address 127.0.0.1 $extra "$sandbox" ":$echo" ":$source" \
    >"$work/fwd.out" 2>"$work/fwd.err" &
  fwd_pid=$!
  until [ "$(grep -c '^Forwarding from' "$work/fwd.out")" -ge 2 ]; do
    kill -0 "$fwd_pid" 2>/dev/null || { cat "$work/fwd.err" >&2; exit 1; }
    sleep 0.1
  done
  e=$(grep -e "-> $echo\$" "$work/fwd.out" | head -1 | awk '{print $3}')
  s=$(grep -e "-> $source\$" "$work/fwd.out" | head -1 | awk '{print $3}')
  if [ "${ISOLATION:-1}" != 0 ]; then
    res=$(python3 perf/isolation.py "$e" "$s" --churn-rate "${CHURN_RATE:-1000}" \
      --churn-seconds "${CHURN_SECONDS:-30}")
    echo "{\"binary\": \"$spec\", \"results\": $res}"
  fi
  for _ in $(seq "${ECHO_HOPS:-0}"); do
    res=$(python3 perf/echo_hops.py "$e" "$s" --netns "$netns" --echo-port "$echo")
    echo "{\"binary\": \"$spec\", \"echo_hops\": $res}"
  done
  kill "$fwd_pid"; wait "$fwd_pid" 2>/dev/null || true; fwd_pid=
done
