#!/usr/bin/env bash
# Time from task submission to task start on a pool instance, warm (an idle instance is
# ready) against cold (the supervisor provisions one on demand), for the process and docker
# providers; appends the table to docs/BENCHMARKS.md.
#
#   bench/pool.sh [RUNS]      # default 10
#
# Needs dockerd and the local image paddock/busybox:test for the docker row (scripts/test.sh
# sets them up); without them the row says missing. Never run by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
cargo build --release --quiet --bench pool_warm_cold -p paddock
cargo build --release --quiet -p paddock
bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/pool_warm_cold-* | grep -v '\.d$' | head -n1)
table=$("$bin" --runs "$runs" --markdown)
{
  echo
  echo "## Pool: task submission to start, warm vs cold, median of $runs ($(date -u +%Y-%m-%d))"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"); $(docker version --format 'docker {{.Server.Version}}' 2>/dev/null || echo 'no docker')."
  echo "Command: \`bench/pool.sh $runs\` (release build; gateway on SQLite and \`paddock pool run\` on this host; warm = \`--min 1\`, one idle instance ready at submission; cold = \`--min 0\`, the supervisor is woken by the watch stream, creates the instance, its agent connects, the task is dispatched; time = the task's \`startedAt\` minus the submission time; task \`true\`, \`--max-use 1\`)."
  echo
  echo "$table"
} | tee -a docs/BENCHMARKS.md
