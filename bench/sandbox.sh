#!/usr/bin/env bash
# Cold start of /bin/true through each sandbox backend, side by side with bare bwrap, crun,
# runc and `docker run`, in one run; appends the table to docs/BENCHMARKS.md.
#
#   bench/sandbox.sh [RUNS]      # default 50 (docker run: at most 20)
#
# Needs root. Set-up (runtimes, dockerd, the local busybox image) is the same as the tests':
# run scripts/test.sh once, or leave dockerd running. Never run by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-50}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/paddock-target}
cargo build --release --quiet --bench sandbox_cold_start -p paddock
bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/sandbox_cold_start-* | grep -v '\.d$' | head -n1)
table=$("$bin" --runs "$runs" --markdown)
{
  echo
  echo "## Sandbox cold start: /bin/true, median of $runs ($(date -u +%Y-%m-%d))"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME")."
  echo "Versions: $(crun --version 2>/dev/null | head -n1), $(runc --version 2>/dev/null | head -n1), $(bwrap --version 2>/dev/null), $(docker version --format 'docker {{.Server.Version}}' 2>/dev/null)."
  echo "Command: \`bench/sandbox.sh $runs\` (release build; contenders run round-robin; each paddock row is one \`Sandbox::run\` as the agent calls it, including cgroup set-up; the clean-up runs in the background, as in the agent)."
  echo
  echo "$table"
} | tee -a docs/BENCHMARKS.md
