#!/usr/bin/env bash
# Start a production-like retrack stack on this machine, every endpoint on 127.0.0.1:
#   1. SeaweedFS (`weed mini`): an S3 server, with a bucket for job storage, the deletion queue
#      and MLflow artifacts;
#   2. an MLflow tracking server (SQLite backend by default, PostgreSQL through
#      RETRACK_MLFLOW_BACKEND_STORE_URI) whose artifacts go to that S3 bucket;
#   3. a two-node Ray cluster: `ray start --head`, then a second `ray start --address ...` with its
#      own CPUs and temp dir (token authentication on by default).
# Credentials are generated per stack (never committed) and written with the endpoints to
# $RETRACK_STACK_DIR/stack.env: `source` it, then `ray job submit -- retrack run JOB.yaml`.
# Settings: see common.sh. Stop with stop.sh.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=common.sh
. ./common.sh

need weed mlflow ray setsid
PY=$(stack_python)

for svc in $SERVICES; do
    if is_ours "$(pid_of "$svc")"; then
        die "the stack in $STACK_DIR is already running ($svc, pid $(pid_of "$svc")); stop it with $(pwd)/stop.sh"
    fi
done
for port in "$S3_PORT" "$MLFLOW_PORT" "$RAY_PORT" "$RAY_DASHBOARD_PORT"; do
    if port_busy "$port"; then
        die "port $port on $HOST is in use; choose others with RETRACK_S3_PORT, RETRACK_MLFLOW_PORT, RETRACK_RAY_PORT, RETRACK_RAY_DASHBOARD_PORT"
    fi
done

# From here on, a failed start stops whatever it had started.
started=0
trap '[ "$started" = 1 ] || { echo "start failed: stopping what was started" >&2; ./stop.sh >&2 || true; }' EXIT

umask 077
mkdir -p "$STACK_DIR" "$LOG_DIR" "$PID_DIR" "$STACK_DIR/weed/data" "$STACK_DIR/mlflow" "$STACK_DIR/ray" "$RAY_TEMP_ROOT"

# ------------------------------------------------------------------ credentials (generated once)
if [ ! -s "$STACK_DIR/s3.json" ]; then
    "$PY" - "$STACK_DIR/s3.json" <<'EOF'
import json, secrets, sys
config = {"identities": [{"name": "retrack", "credentials": [{"accessKey": "retrack-" + secrets.token_hex(4), "secretKey": secrets.token_hex(24)}],
                          "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
with open(sys.argv[1], "w") as f:
    json.dump(config, f)
EOF
fi
S3_ACCESS_KEY=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["identities"][0]["credentials"][0]["accessKey"])' "$STACK_DIR/s3.json")
S3_SECRET_KEY=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["identities"][0]["credentials"][0]["secretKey"])' "$STACK_DIR/s3.json")
TOKEN_FILE=$STACK_DIR/ray/auth_token
if [ "$RAY_AUTH" = token ] && [ ! -s "$TOKEN_FILE" ]; then
    "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE"
fi

# ------------------------------------------------------------------ the environment of every job
cat >"$ENV_FILE" <<EOF
# retrack local stack ($STACK_DIR): source this file, then e.g.
#   ray job submit -- retrack run /abs/path/JOB.yaml
export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_REGION=$S3_REGION
export AWS_EC2_METADATA_DISABLED=true
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export MLFLOW_S3_ENDPOINT_URL=http://$HOST:$S3_PORT
export RAY_ADDRESS=$HOST:$RAY_PORT
export RAY_API_SERVER_ADDRESS=http://$HOST:$RAY_DASHBOARD_PORT
export RAY_USAGE_STATS_ENABLED=0
# Ray's CLI and ray.init() rewrite 127.0.0.1 into the host's outward address unless this is 0 (the
# cluster listens on 127.0.0.1 only). A joining "ray start --address" refuses it: use start.sh.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RETRACK_STACK_BUCKET=$S3_BUCKET
export RETRACK_QUEUE=s3://$S3_BUCKET/queue
EOF
if [ "$RAY_AUTH" = token ]; then
    printf 'export RAY_AUTH_MODE=token\nexport RAY_AUTH_TOKEN_PATH=%s\n' "$TOKEN_FILE" >>"$ENV_FILE"
else
    printf 'export RAY_AUTH_MODE=disabled\n' >>"$ENV_FILE"
fi
# shellcheck disable=SC1090
. "$ENV_FILE"

# ------------------------------------------------------------------ 1. SeaweedFS S3
say "starting SeaweedFS S3 on $AWS_ENDPOINT_URL"
launch weed weed mini \
    -dir="$STACK_DIR/weed/data" -ip="$HOST" -ip.bind="$HOST" -master.telemetry=false \
    -s3.config="$STACK_DIR/s3.json" -s3.port="$S3_PORT" -s3.port.grpc="$(free_port)" \
    -master.port="$(free_port)" -master.port.grpc="$(free_port)" \
    -volume.port="$(free_port)" -volume.port.grpc="$(free_port)" \
    -filer.port="$(free_port)" -filer.port.grpc="$(free_port)" \
    -s3.port.iceberg=0 -s3.port.lance=0 -admin.port="$(free_port)" -admin.ui=false -webdav=false

bucket_ready() {
    "$PY" - "$S3_BUCKET" <<'EOF'
import os, sys
import boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))
bucket = sys.argv[1]
try:
    s3.head_bucket(Bucket=bucket)
except Exception:
    s3.create_bucket(Bucket=bucket)
s3.put_object(Bucket=bucket, Key="_stack/ready", Body=b"ok")
assert s3.get_object(Bucket=bucket, Key="_stack/ready")["Body"].read() == b"ok"
EOF
}
wait_for weed 90 bucket_ready
say "bucket s3://$S3_BUCKET is ready"

# ------------------------------------------------------------------ 2. MLflow
say "starting MLflow on $MLFLOW_TRACKING_URI (backend ${MLFLOW_BACKEND_STORE_URI%%:*}, artifacts s3://$S3_BUCKET/mlflow)"
launch mlflow mlflow server \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --default-artifact-root "s3://$S3_BUCKET/mlflow" \
    --host "$HOST" --port "$MLFLOW_PORT" --workers 1
mlflow_ready() { "$PY" -c 'import sys, urllib.request; sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200 else 1)' "$MLFLOW_TRACKING_URI"; }
wait_for mlflow 120 mlflow_ready

# ------------------------------------------------------------------ 3. Ray: head + a second node
# Ray advertises the address it finds for this host and then listens on every interface;
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it take 127.0.0.1, and a node whose address is
# 127.0.0.1 listens on 127.0.0.1 only.
say "starting the Ray head (GCS $RAY_ADDRESS, dashboard $RAY_API_SERVER_ADDRESS, $RAY_HEAD_CPUS CPUs)"
launch ray-head env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --block \
    --port="$RAY_PORT" --node-name=retrack-head \
    --include-dashboard=true --dashboard-host="$HOST" --dashboard-port="$RAY_DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$(free_port)" --ray-client-server-port="$(free_port)" \
    --num-cpus="$RAY_HEAD_CPUS" --num-gpus=0 --object-store-memory="$RAY_OBJECT_STORE_BYTES" \
    --min-worker-port=0 --max-worker-port=0 \
    --temp-dir="$RAY_TEMP_ROOT/head" --disable-usage-stats

alive_nodes() {
    "$PY" - "$1" <<'EOF'
import os, sys
from ray.util.state import list_nodes
nodes = [n for n in list_nodes(address=os.environ["RAY_API_SERVER_ADDRESS"], filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)]
sys.exit(0 if len(nodes) >= int(sys.argv[1]) else 1)
EOF
}
wait_for ray-head 180 alive_nodes 1

# The second node joins through 127.0.0.1 as well; ray_start_loopback.py is `ray start` with the
# CLI's rewrite of loopback addresses turned off (see its docstring).
say "starting the second Ray node ($RAY_WORKER_CPUS CPUs)"
launch ray-node2 env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "$PY" "$(pwd)/ray_start_loopback.py" start --block --address="$RAY_ADDRESS" \
    --node-ip-address="$HOST" --node-name=retrack-node2 \
    --dashboard-agent-listen-port="$(free_port)" \
    --num-cpus="$RAY_WORKER_CPUS" --num-gpus=0 --object-store-memory="$RAY_OBJECT_STORE_BYTES" \
    --min-worker-port=0 --max-worker-port=0 \
    --temp-dir="$RAY_TEMP_ROOT/node2" --disable-usage-stats
wait_for ray-node2 180 alive_nodes 2

started=1
say "ready. S3 $AWS_ENDPOINT_URL (bucket $S3_BUCKET), MLflow $MLFLOW_TRACKING_URI, Ray $RAY_ADDRESS (2 nodes), jobs $RAY_API_SERVER_ADDRESS"
say "use it:  source $ENV_FILE"
