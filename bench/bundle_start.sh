#!/usr/bin/env bash
# Time to the first instruction of a bundle's entrypoint (`date +%s%N` as its first line),
# as the agent runs a `bundle.run`: digest-cache hit vs cold (fetch over loopback HTTP +
# verify + unpack), a ~100 KB and a ~20 MB bundle, on the `host` and `process` backends;
# appends the table to docs/BENCHMARKS.md.
#
#   bench/bundle_start.sh [RUNS] [DIR]   # default 20 per contender (after 2 warm-up rounds),
#                                        # work and cache directories under /var/tmp
#
# Needs root for the `process` backend. Never run by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-20}
dir=${2:-/var/tmp}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
cargo build --release --quiet --bench bundle_start -p paddock
bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/bundle_start-* | grep -v '\.d$' | head -n1)
load=$(cut -d' ' -f1-3 /proc/loadavg)
table=$("$bin" --runs "$runs" --dir "$dir" --markdown)
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo
  echo "## Bundle start: time to the entrypoint's first instruction, cache hit vs cold ($(date -u +%Y-%m-%d))"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"); work and cache directories on $(df -T "$dir" | awk 'NR==2{print $2}') (\`$dir\`); load average $load at the start, $load_end at the end."
  echo "Command: \`bench/bundle_start.sh $runs $dir\` (release build of \`crates/paddock/benches/bundle_start.rs\`, commit $(git rev-parse --short HEAD)). Each sample does what the runner does for a \`bundle.run\`: work directory, \`bundle_run::prepare\` (digest cache; on a miss, fetch from a loopback HTTP server in the bench process, verified while streaming), unpack, \`Sandbox::run\` of \`/bin/sh app/main.sh\` (default network); the time ends at the entrypoint's \`date +%s%N\`, so it includes one fork + exec of \`date\`. Contenders run round-robin, shuffled each round, 2 warm-up rounds; the work directory is removed after each sample, untimed."
  echo
  echo "$table"
} | tee -a docs/BENCHMARKS.md
