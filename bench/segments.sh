#!/usr/bin/env bash
# Where a no-op round trip's time goes (issue 6): runs the dispatch bench's round trips on
# SQLite long enough to trace, records the socket and WAL syscalls of the bench client, the
# gateway and the agent for a few seconds with `perf`, and prints the p50 of each segment.
# Needs `perf` (apt: linux-perf) and root. Usage: bench/segments.sh [seconds to record, 3]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
cargo build --release -q -p paddock --bin paddock --bench dispatch
bench=$(ls -t "$CARGO_TARGET_DIR"/release/deps/dispatch-* | grep -v '\.d$' | head -n1)
scratch=$(mktemp -d /var/tmp/paddock-segments.XXXXXX)
# The bench runs in a process group of its own, so that its gateway and agent go with it.
trap 'kill -- -"$bpid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT
PADDOCK_BENCH_DIR="$scratch" setsid "$bench" --db sqlite --roundtrips 200000 --only rt \
  >"$scratch/bench.log" 2>&1 &
bpid=$!
# Wait for the agent to be paired and the round trips to be under way.
for _ in $(seq 100); do
  apid=$(pgrep -f -n "release/paddock agent" || true)
  [ -n "$apid" ] && break
  sleep 0.1
done
[ -n "$apid" ] || { echo "no agent started" >&2; exit 1; }
sleep 3
gpid=$(pgrep -f -n "release/paddock gateway")
events=syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_write
events=$events,syscalls:sys_exit_recvfrom,syscalls:sys_exit_read,syscalls:sys_enter_pwrite64
perf record -q -o "$scratch/perf.data" -e "$events" -p "$bpid,$gpid,$apid" -- sleep "$secs" \
  2>/dev/null
perf script -i "$scratch/perf.data" -F comm,pid,tid,cpu,time,event,trace >"$scratch/perf.txt" \
  2>/dev/null
python3 bench/segments.py "$scratch/perf.txt" "$bpid" "$gpid" "$apid"
