# Shared by the local instance scripts (seed 000). Sourced, not run.
# Settings (environment):
#   VM_INSTANCE_ID     the instance (required)
#   RUNTIME_WORKDIR    where runtimes keep their pid file and task work directories
#                      (default: runtime, relative to the current directory)
#   RUNTIME_LOG_DIR    where runtime logs go (default: /tmp)
set -euo pipefail
: "${VM_INSTANCE_ID:?VM_INSTANCE_ID is required}"
case "$VM_INSTANCE_ID" in
  *[!A-Za-z0-9_-]*) echo "VM_INSTANCE_ID may only hold letters, digits, - and _" >&2; exit 2 ;;
esac
RUNTIME_WORKDIR=${RUNTIME_WORKDIR:-runtime}
RUNTIME_LOG_DIR=${RUNTIME_LOG_DIR:-/tmp}
instance_dir="$RUNTIME_WORKDIR/$VM_INSTANCE_ID"
pid_file="$instance_dir/agent.pid"
log_file="$RUNTIME_LOG_DIR/paddock-vm-$VM_INSTANCE_ID.log"

# The runtime's pid if it is running (and really is this instance's agent), else nothing.
running_pid() {
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(cat "$pid_file")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "agent connect" || return 1
  echo "$pid"
}

# Stops the runtime: SIGTERM (running tasks are handed back), SIGKILL after 10 s.
stop_runtime() {
  local pid
  pid=$(running_pid) || { rm -f "$pid_file"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pid_file"
}
