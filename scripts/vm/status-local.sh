#!/usr/bin/env bash
# Shows whether the local runtime of an instance runs. Exit 0 running, 1 not running.
# Required: VM_INSTANCE_ID. Optional: RUNTIME_WORKDIR, RUNTIME_LOG_DIR, --json.
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if pid=$(running_pid); then state=running; else state=stopped; pid=; fi
if [ "${1:-}" = "--json" ]; then
  printf '{"instanceId":"%s","runtime":"%s","pid":%s,"log":"%s"}\n' \
    "$VM_INSTANCE_ID" "$state" "${pid:-null}" "$log_file"
else
  echo "instance $VM_INSTANCE_ID: runtime $state${pid:+ (pid $pid)}; log $log_file"
fi
[ "$state" = running ]
