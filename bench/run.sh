#!/usr/bin/env bash
# Dispatch benchmark (issue 6): Paddock (gateway + host-backend agents, on SQLite and on
# PostgreSQL) next to the raw WebSocket floor, Dask distributed, Ray and Celery (Redis), in
# one run on this machine; appends a section to docs/BENCHMARKS.md.
#
#   bench/run.sh [--quick]     # --quick: 200 round trips, 2,000 tasks, 1,000 idle agents
#
# Needs root (PostgreSQL runs as the postgres user), python3 with venv, and network access to
# PyPI and apt the first time: the peers are installed into a venv under /var/cache (not a
# project dependency), redis-server and PostgreSQL 15 from apt when missing. Takes about
# 5 minutes once the venv exists (313-317 s here); the first run also installs it. Never part of CI's test command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)
quick=0; [ "${1:-}" = "--quick" ] && quick=1
if [ $quick = 1 ]; then rts=200; tasks=2000; idle=1000; budget=15; else rts=2000; tasks=20000; idle=1000,10000; budget=45; fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
venv=${PADDOCK_PEERS_VENV:-/var/cache/paddock-peers-venv}
log() { echo "[bench] $*" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }
load_start=$(load1)
log "load average (1 min) at start: $load_start"

# --- builds and tools -------------------------------------------------------------------
log "building (release)"
cargo build --release --quiet -p paddock --bin paddock --bench dispatch
bench_bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/dispatch-* | grep -v '\.d$' | head -n1)
if ! command -v redis-server >/dev/null; then
  log "installing redis-server (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$pg_bin" ]; then
  log "installing postgresql (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import distributed, celery, redis' 2>/dev/null; then
  log "installing the peers into $venv (pip)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "distributed==2026.8.0" "celery[redis]==5.7.0" "redis==8.1.0"
  "$venv/bin/pip" install -q "ray==2.60.0" || log "ray could not be installed for $("$venv/bin/python" --version)"
fi
py="$venv/bin/python"

# --- throwaway services, cleaned up on exit ------------------------------------------------
work=$(mktemp -d /var/tmp/paddock-bench.XXXXXX)
chmod 755 "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_dir="$work/pg"; mkdir -p "$pg_dir"; chown postgres: "$pg_dir"
redis_pid=""
cleanup() {
  runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
pg_port=$(free_port)
log "starting PostgreSQL on 127.0.0.1:$pg_port (durable defaults: fsync on, synchronous_commit on)"
runuser -u postgres -- "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
  -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
export PADDOCK_TEST_PG_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
redis_port=$(free_port)
mkdir -p "$work/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work/redis" --save '' \
  --appendonly yes --appendfsync everysec --daemonize no --logfile "$work/redis/log" &
redis_pid=$!
export CELERY_BENCH_REDIS="redis://127.0.0.1:$redis_port/0"

# --- Paddock and the floor -----------------------------------------------------------------
out="$work/out"; mkdir -p "$out"
log "paddock: floor, round trips, throughput (1 and 2 agents), idle agents; SQLite and PostgreSQL"
PADDOCK_BENCH_DIR="$work" "$bench_bin" --db sqlite,postgres --roundtrips $rts --tasks $tasks \
  --idle $idle --json "$out/paddock.json"
load_mid=$(load1)

# --- peers ---------------------------------------------------------------------------------
declare -A peer_status
for peer in dask ray celery; do
  log "peer: $peer"
  if timeout 300 "$py" "bench/peers/${peer}_bench.py" --roundtrips $rts --tasks $tasks \
      --budget-s $budget --json "$out/$peer.json" 2>"$out/$peer.log"; then
    peer_status[$peer]=ok
  else
    peer_status[$peer]="exit $? ($(tail -n1 "$out/$peer.log" | cut -c1-120))"
    log "$peer failed: ${peer_status[$peer]}"
  fi
done
load_end=$(load1)

# --- report --------------------------------------------------------------------------------
status_json=$(for p in dask ray celery; do printf '"%s": "%s",' "$p" "${peer_status[$p]//\"/\'}"; done)
cat >"$out/meta.json" <<JSON
{
  "date": "$(date -u +%Y-%m-%d)",
  "machine": "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 --version), PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}')",
  "load_start": "$load_start", "load_mid": "$load_mid", "load_end": "$load_end",
  "command": "bench/run.sh${1:+ $1}",
  "elapsed": $(( $(date +%s) - started )),
  "paddock_version": "paddock $(git describe --always --dirty 2>/dev/null || echo unknown)",
  "peer_status": { ${status_json%,} }
}
JSON
"$py" bench/peers/report.py "$out" "$out/meta.json" | tee -a docs/BENCHMARKS.md
