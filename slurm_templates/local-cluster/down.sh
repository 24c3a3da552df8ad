#!/usr/bin/env bash
# Stop the local SLURM cluster (`make slurm-down`): exactly the daemons up.sh started, found by the
# pid files under $GPT2_SLURM_DIR/run and checked by command line, and nothing else. A munged that
# up.sh found already running is left alone. Jobs still running lose their nodes; state, logs and
# the accounting database stay, so `make slurm-up` brings the same cluster back.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"
need_root "$HERE/down.sh" "$@"

[[ -d $RUN_DIR ]] || { log "nothing to stop ($RUN_DIR does not exist)"; exit 0; }
for name in "${DAEMONS[@]}"; do stop_daemon "$name"; done
log "stopped; files kept under $GPT2_SLURM_DIR"
