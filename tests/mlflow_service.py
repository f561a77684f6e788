"""A real `mlflow server` on loopback (SQLite backend store, artifacts on the SeaweedFS S3 server)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.services import S3Service, Service, free_port, wait_until


@dataclass
class MlflowService:
    tracking_uri: str
    artifact_root: str
    service: Service


def start_mlflow(workdir: Path, s3: S3Service, timeout: float = 240.0) -> MlflowService:
    import os

    import requests

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifact_root = s3.uri("mlflow-artifacts")
    env = {**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root", artifact_root,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log_path = workdir / "mlflow.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service("mlflow", proc, workdir, log_path, extra_stop=[log.close], cmd=cmd, env=env)
    uri = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(uri + "/health", timeout=2).ok, service, timeout, "/health answered")
    return MlflowService(uri, artifact_root, service)


@pytest.fixture(scope="session")
def mlflow_server(seaweedfs_s3, tmp_path_factory) -> Iterator[MlflowService]:
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), seaweedfs_s3)
    try:
        yield server
    finally:
        server.service.stop()
