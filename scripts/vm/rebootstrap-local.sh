#!/usr/bin/env bash
# Stops then bootstraps the local runtime of an instance again (same environment as
# bootstrap-local.sh, including a fresh VM_TOKEN). To have the gateway do it, with a new
# token and the cooldown bypassed: `paddock vm rebootstrap` (POST /api/v1/vm/rebootstrap).
here="$(dirname "${BASH_SOURCE[0]}")"
"$here/stop-local.sh"
exec "$here/bootstrap-local.sh"
