#!/usr/bin/env bash
# Show which services of the local stack run, and where (exit 0 only when all of them run).
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=common.sh
. ./common.sh

all=0
for svc in $SERVICES; do
    pid=$(pid_of "$svc" || true)
    if is_ours "$pid"; then
        echo "$svc: running (process group $pid, log $LOG_DIR/$svc.log)"
    else
        echo "$svc: stopped"
        all=1
    fi
done
[ -f "$ENV_FILE" ] && echo "environment: source $ENV_FILE"
exit $all
