#!/usr/bin/env bash
# Runs the whole Paddock test suite, doing its own set-up first.
#
#   scripts/test.sh            # everything: fmt, clippy, OpenAPI check, all tests
#   scripts/test.sh -- ARGS    # extra arguments for `cargo nextest run` / `cargo test`
#
# What it sets up when missing (idempotent, safe to re-run):
#   - PostgreSQL 15 (apt), started as a throwaway cluster in a temp dir on a free loopback
#     port (initdb + pg_ctl, fsync off), stopped again on exit;
#   - the sandbox runtimes (apt): crun, runc, docker.io, bubblewrap, busybox-static; the
#     hugetlb cgroup-v1 mount crun needs on hybrid hosts; dockerd (started if not running,
#     stopped again on exit); the local image `paddock/busybox:test` (no registry needed).
# Environment it exports to the tests:
#   PADDOCK_TEST_PG_URL   admin URL of the throwaway cluster (each test creates its own DB)
#   PADDOCK_TEST_S3_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   a throwaway s3s-fs bucket
# CARGO_TARGET_DIR defaults to /var/cache/paddock-target (kept between runs; may be empty).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
mkdir -p "$CARGO_TARGET_DIR"

extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi

log() { printf '==> %s\n' "$*" >&2; }

apt_updated=0
need_apt() {
  # need_apt COMMAND PACKAGE...: installs PACKAGEs when COMMAND is missing.
  local cmd=$1; shift
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then
    if [ "$(id -u)" != 0 ]; then log "missing $cmd and not root: install $* yourself"; exit 1; fi
    if [ $apt_updated = 0 ]; then log "apt-get update"; apt-get update -qq; apt_updated=1; fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

# --- PostgreSQL -----------------------------------------------------------------------
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  need_apt /usr/lib/postgresql/15/bin/initdb postgresql
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
pg_dir=$(mktemp -d /tmp/paddock-pg.XXXXXX)
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$pg_dir"
  as_pg=(runuser -u postgres --)
fi
cleanup() {
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
  if [ -n "${dockerd_pid:-}" ]; then kill "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
log "starting throwaway PostgreSQL on 127.0.0.1:$pg_port"
"${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres --no-sync >/dev/null
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
  -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
  start >/dev/null
export PADDOCK_TEST_PG_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"

# --- S3 server (s3s-fs) for the bundle store contract tests ---------------------------
# Installs s3s-fs when missing, serves a temp dir on a free loopback port with throwaway
# keys, creates the bucket (a directory under its root) and exports PADDOCK_TEST_S3_URL,
# AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Stopped by an EXIT trap of its own that
# chains to the one above.
start_s3() {
  if ! command -v s3s-fs >/dev/null 2>&1; then
    log "installing s3s-fs (cargo install, about 3 minutes once)"
    cargo install s3s-fs --version 0.14.1 --locked --features binary --quiet
  fi
  s3_dir=$(mktemp -d /tmp/paddock-s3.XXXXXX)
  mkdir -p "$s3_dir/data/paddock-test"
  local port key secret
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  key="paddock$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
  secret=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
  log "starting s3s-fs on 127.0.0.1:$port"
  s3s-fs --host 127.0.0.1 --port "$port" --access-key "$key" --secret-key "$secret" \
    "$s3_dir/data" >"$s3_dir/log" 2>&1 &
  s3_pid=$!
  trap 'kill "$s3_pid" 2>/dev/null || true; wait "$s3_pid" 2>/dev/null || true; rm -rf "$s3_dir"; cleanup' EXIT
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
    || { log "s3s-fs did not start:"; tail -20 "$s3_dir/log" >&2; exit 1; }
  export AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret
  export PADDOCK_TEST_S3_URL="s3://paddock-test?endpoint=http://127.0.0.1:$port&region=us-east-1"
}
start_s3

# --- sandbox runtimes ---------------------------------------------------------------
need_apt crun crun
need_apt runc runc
need_apt dockerd docker.io
need_apt bwrap bubblewrap
need_apt /bin/busybox busybox-static
# Bundle runtimes (bundle.run e2e: node and python bundles).
need_apt node nodejs
need_apt npm npm
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt /nonexistent-venv python3-venv
# crun refuses cgroup-v1 hybrid hosts until hugetlb is a v1 hierarchy (see DESIGN.md).
if [ "$(id -u)" = 0 ] && [ -d /sys/fs/cgroup/memory ] && ! mountpoint -q /sys/fs/cgroup/hugetlb; then
  mkdir -p /sys/fs/cgroup/hugetlb
  mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb || log "warning: could not mount the hugetlb cgroup"
fi
dockerd_pid=""
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  dockerd --data-root /var/lib/docker --exec-root /var/run/docker -p /var/run/docker-paddock-test.pid \
    >/tmp/paddock-dockerd.log 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start:"; tail -20 /tmp/paddock-dockerd.log >&2; exit 1; }
fi
if ! docker image inspect paddock/busybox:test >/dev/null 2>&1; then
  log "building the local test image paddock/busybox:test"
  img=$(mktemp -d)
  mkdir -p "$img/bin"
  cp /bin/busybox "$img/bin/busybox"
  for a in $("$img/bin/busybox" --list); do [ -e "$img/bin/$a" ] || ln -s busybox "$img/bin/$a"; done
  tar -C "$img" -c . | docker import - paddock/busybox:test >/dev/null
  rm -rf "$img"
fi

# --- checks and tests -----------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo build"
cargo build --workspace --all-targets --quiet
log "OpenAPI document is up to date"
"$CARGO_TARGET_DIR/debug/paddock" openapi | diff -u docs/openapi.json - \
  || { log "docs/openapi.json is stale: run: cargo run -- openapi > docs/openapi.json"; exit 1; }
log "tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  results=$(mktemp)
  cargo nextest run --workspace --no-fail-fast --retries 0 "${extra[@]}" 2>&1 | tee "$results"
  cargo test --workspace --doc --quiet
  # One plain closing line for the whole run (the doc tests' own summaries come last and
  # count no tests): "tests: N passed, 0 failed, N skipped".
  summary=$(grep -E '^ *Summary \[' "$results" | tail -n1)
  rm -f "$results"
  n_passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
  n_skipped=$(grep -oE '[0-9]+ skipped' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
  echo "tests: ${n_passed} passed, 0 failed, ${n_skipped} skipped"
else
  cargo test --workspace --no-fail-fast "${extra[@]}"
fi
