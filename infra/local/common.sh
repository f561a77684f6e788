# shellcheck shell=bash
# Settings shared by start.sh, stop.sh and status.sh (sourced, not run). Every value can be
# overridden from the environment; the defaults give a stack on the usual ports of each service.
#
#   RETRACK_STACK_DIR            state: data, logs, pid files, generated credentials, stack.env
#   RETRACK_S3_PORT              SeaweedFS S3 gateway            (default 8333)
#   RETRACK_S3_BUCKET            bucket created at start         (default retrack)
#   RETRACK_MLFLOW_PORT          MLflow tracking server          (default 5000)
#   RETRACK_MLFLOW_BACKEND_STORE_URI  sqlite:///... (default) or postgresql://user@host/db
#   RETRACK_RAY_PORT             Ray GCS of the head node        (default 6379)
#   RETRACK_RAY_DASHBOARD_PORT   Ray dashboard / job API         (default 8265)
#   RETRACK_RAY_HEAD_CPUS        logical CPUs of the head node   (default 2)
#   RETRACK_RAY_WORKER_CPUS      logical CPUs of the second node (default 2)
#   RETRACK_RAY_OBJECT_STORE_BYTES  object store per node        (default 256 MiB)
#   RETRACK_RAY_AUTH             token (default) or disabled
#   RETRACK_RAY_TEMP_DIR         root of the two nodes' Ray temp dirs (kept short: socket paths)

STACK_DIR=${RETRACK_STACK_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/retrack/stack}
S3_PORT=${RETRACK_S3_PORT:-8333}
S3_BUCKET=${RETRACK_S3_BUCKET:-retrack}
S3_REGION=${RETRACK_S3_REGION:-us-east-1}
MLFLOW_PORT=${RETRACK_MLFLOW_PORT:-5000}
MLFLOW_BACKEND_STORE_URI=${RETRACK_MLFLOW_BACKEND_STORE_URI:-sqlite:///$STACK_DIR/mlflow/mlflow.db}
RAY_PORT=${RETRACK_RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RETRACK_RAY_DASHBOARD_PORT:-8265}
RAY_HEAD_CPUS=${RETRACK_RAY_HEAD_CPUS:-2}
RAY_WORKER_CPUS=${RETRACK_RAY_WORKER_CPUS:-2}
RAY_OBJECT_STORE_BYTES=${RETRACK_RAY_OBJECT_STORE_BYTES:-268435456}
RAY_AUTH=${RETRACK_RAY_AUTH:-token}
HOST=127.0.0.1

# Ray puts Unix sockets under its temp dir (a path may not exceed 107 bytes): keep it short and
# unique to this stack directory.
_stack_hash=$(printf '%s' "$STACK_DIR" | cksum | cut -d' ' -f1)
RAY_TEMP_ROOT=${RETRACK_RAY_TEMP_DIR:-${TMPDIR:-/tmp}/rtk-$(id -u)-$_stack_hash}

LOG_DIR=$STACK_DIR/logs
PID_DIR=$STACK_DIR/pids
ENV_FILE=$STACK_DIR/stack.env
# Start order; stop.sh walks it backwards.
SERVICES="weed mlflow ray-head ray-node2"

die() { echo "error: $*" >&2; exit 1; }
say() { echo "[retrack-stack] $*"; }

need() {
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is not on PATH (activate the project's virtualenv: . .venv/bin/activate)"
    done
}

# The Python next to the tools (the project's virtualenv), for the small helpers below.
stack_python() {
    local ray_bin
    ray_bin=$(command -v ray) || die "'ray' is not on PATH"
    if [ -x "$(dirname "$ray_bin")/python" ]; then echo "$(dirname "$ray_bin")/python"; else command -v python3; fi
}

free_port() { "$(stack_python)" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

port_busy() { "$(stack_python)" -c 'import socket, sys; s = socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"; }

pid_of() { [ -f "$PID_DIR/$1.pid" ] && cat "$PID_DIR/$1.pid"; }

# A recorded pid counts as ours only while it is alive AND its environment carries this stack's
# marker (set by launch), so a pid reused by another program is never touched.
is_ours() {
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "RETRACK_STACK_DIR=$STACK_DIR"
}

# True while any process of the group led by $1 is alive.
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# Start "$@" as the leader of a new session/process group (so that stop.sh can end exactly the
# processes it started, children included), logging to $LOG_DIR/$name.log.
launch() {
    local name=$1; shift
    setsid env RETRACK_STACK_DIR="$STACK_DIR" "$@" >"$LOG_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$PID_DIR/$name.pid"
}

# wait_for NAME SECONDS CMD...: poll CMD until it succeeds; fail with the service's log tail.
wait_for() {
    local name=$1 timeout=$2; shift 2
    local deadline=$((SECONDS + timeout)) pid
    pid=$(pid_of "$name")
    until "$@" >/dev/null 2>&1; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOG_DIR/$name.log" >&2
            die "$name exited during start-up (log: $LOG_DIR/$name.log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$LOG_DIR/$name.log" >&2
            die "$name did not become ready within ${timeout}s (log: $LOG_DIR/$name.log)"
        fi
        sleep 0.5
    done
}
