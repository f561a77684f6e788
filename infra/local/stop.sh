#!/usr/bin/env bash
# Stop the local stack started by start.sh: the second Ray node, the Ray head, MLflow, SeaweedFS.
# Only the processes that start.sh started are signalled: each service runs as the leader of its
# own process group, recorded in $RETRACK_STACK_DIR/pids, and is checked to carry this stack's
# marker before anything is sent to it (no `ray stop`, which would end every Ray on the machine).
#   stop.sh           stop, keep data, logs and credentials
#   stop.sh --purge   stop, then delete the stack directory and the Ray temp dirs
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=common.sh
. ./common.sh

purge=0
case "${1:-}" in
    --purge) purge=1 ;;
    "") ;;
    *) die "usage: $0 [--purge]" ;;
esac

stop_service() {
    local name=$1 pid deadline
    pid=$(pid_of "$name") || return 0
    if ! is_ours "$pid"; then
        rm -f "$PID_DIR/$name.pid"
        return 0
    fi
    say "stopping $name (process group $pid)"
    # The leader first: `ray start --block` and `weed mini` shut their own children down.
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while group_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    if group_alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while group_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
        group_alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$PID_DIR/$name.pid"
}

for svc in $(echo "$SERVICES" | tr ' ' '\n' | tac); do
    stop_service "$svc"
done

if [ "$purge" = 1 ]; then
    say "deleting $STACK_DIR and $RAY_TEMP_ROOT"
    rm -rf -- "$STACK_DIR" "$RAY_TEMP_ROOT"
fi
say "stopped"
