#!/usr/bin/env bash
# Bootstraps one instance on this machine (seed 000): starts a Paddock agent that connects to
# the gateway's /ws/vm with the instance token. The gateway runs this as VM_BOOTSTRAP_CMD
# (the default outside production) with the environment below; the instance becomes ready
# when the agent connects, not when this script exits.
#
# Required: VM_INSTANCE_ID, VM_TOKEN (never printed), VM_ORG_ID, VM_USER_ID
# Optional: CONTROL_PLANE_WS (default ws://127.0.0.1:3101/ws/vm), RUNTIME_WORKDIR (runtime),
#           RUNTIME_LOG_DIR (/tmp), VM_TICKET, VM_MODE, PADDOCK_BIN (default: paddock on PATH),
#           and any PADDOCK_AGENT_* setting for the agent (e.g. PADDOCK_AGENT_EXEC_BACKEND).
# A runtime already running for the instance is replaced (its token may be stale).
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${VM_TOKEN:?VM_TOKEN is required}"
: "${VM_ORG_ID:?VM_ORG_ID is required}"
: "${VM_USER_ID?VM_USER_ID is required}"
export CONTROL_PLANE_WS=${CONTROL_PLANE_WS:-ws://127.0.0.1:3101/ws/vm}
bin=${PADDOCK_BIN:-$(command -v paddock || true)}
[ -x "$bin" ] || { echo "no paddock binary: set PADDOCK_BIN or put paddock on PATH" >&2; exit 3; }
mkdir -p "$instance_dir/work" "$RUNTIME_LOG_DIR"
stop_runtime
export VM_TOKEN
export PADDOCK_AGENT_WORKDIR_ROOT=${PADDOCK_AGENT_WORKDIR_ROOT:-$(cd "$instance_dir/work" && pwd)}
# Own session: the runtime outlives this script and the gateway's process group.
setsid "$bin" agent connect --name "instance-$VM_INSTANCE_ID" \
  </dev/null >>"$log_file" 2>&1 &
echo $! >"$pid_file"
# Fail fast if it dies at once (bad binary, refused token).
sleep 0.2
if ! running_pid >/dev/null; then
  echo "the runtime exited at once; last lines of $log_file:" >&2
  tail -n 5 "$log_file" >&2 || true
  exit 1
fi
echo "instance $VM_INSTANCE_ID: runtime started (pid $(cat "$pid_file"), log $log_file)"
