#!/usr/bin/env bash
# Stops the local runtime of an instance (running tasks are handed back to the gateway).
# Required: VM_INSTANCE_ID. Optional: RUNTIME_WORKDIR, RUNTIME_LOG_DIR.
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stop_runtime
echo "instance $VM_INSTANCE_ID: runtime stopped"
