#!/usr/bin/env bash
# Verify + unpack throughput of a ~200 MB bundle: paddock's one-pass `unpack_verified`
# against `sha256sum` + `tar --zstd -xf` on the same file; appends the table to
# docs/BENCHMARKS.md.
#
#   bench/bundle.sh [SIZE_MB] [RUNS]     # default 200 MB, 5 runs (after one warm-up)
#
# Needs GNU tar with --zstd and the zstd binary (apt: zstd). Never run by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size=${1:-200}
runs=${2:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
command -v zstd >/dev/null || { echo "zstd is missing (apt-get install zstd)" >&2; exit 1; }
cargo build --release --quiet --bench unpack -p paddock-bundle
bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/unpack-* | grep -v '\.d$' | head -n1)
load=$(cut -d' ' -f1-3 /proc/loadavg)
table=$("$bin" --size-mb "$size" --runs "$runs" --dir /var/tmp --markdown)
{
  echo
  echo "## Bundle verify + unpack, ${size} MB bundle ($(date -u +%Y-%m-%d))"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"); files on $(df -T /var/tmp | awk 'NR==2{print $2}') (page cache warm); load average $load at the start."
  echo "Versions: $(tar --version | head -n1), $(zstd --version | head -n1), $(sha256sum --version | head -n1)."
  echo "Command: \`bench/bundle.sh $size $runs\` (release build of \`crates/paddock-bundle/benches/unpack.rs\`; each run unpacks into a fresh directory, removed afterwards)."
  echo
  echo "$table"
} | tee -a docs/BENCHMARKS.md
