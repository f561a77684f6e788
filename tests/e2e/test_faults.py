"""The fault suite (issue 8): each test causes a fault for real — a Ray worker or the driver
SIGKILLed, the S3 or MLflow server killed and restarted, a write refused by the OS, two jobs
racing for one model — and checks what the job does and what a rerun redoes. docs/reliability.md
tables the outcomes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrack.errors import StorageError
from retrack.config.spec import load_spec
from tests.fixtures.processes import kill_retrack_when
from tests.fixtures.specs import spec_file

pytestmark = pytest.mark.integration

ALL_STAGES = ["index", "neighbours", "unlearn", "evaluate", "register"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def ray_processes(title: str) -> list[int]:
    """PIDs of this test's Ray worker processes now running `title` (Ray sets a worker's process
    title to `ray::<task or actor method>` while it runs one; idle workers say `ray::IDLE`)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith(f"ray::{title}"):
            out.append(p.pid)
    return out


class KillWhen(threading.Thread):
    """Polls `find()` in the background; SIGKILLs the first PID it returns (once)."""

    def __init__(self, find, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.find, self.timeout = find, timeout
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            pids = self.find()
            if pids:
                self.killed = pids[0]
                os.kill(self.killed, signal.SIGKILL)
                return
            time.sleep(0.02)


def complete_checkpoints(storage_root: Path, run_name: str) -> list[Path]:
    """The run's checkpoints whose files are all uploaded and verify: a kill timed on a checkpoint
    directory merely existing can land mid-upload, and then restarting from step 0 is right."""
    from retrack.training.checkpoint import verified_state

    return [c for c in sorted((storage_root / "checkpoints" / run_name).glob("checkpoint_*")) if verified_state(str(c))]


def long_training(root: Path, tmp: Path, request_id: str, **extra) -> Path:
    """A job whose unlearning runs long enough (tiny model, many small steps, frequent
    checkpoints) for a kill to land between two checkpoints."""
    return spec_file(root, tmp, request_id=request_id, train={"steps": 30, "batch_size": 4, "checkpoint_every": 5}, **extra)


def marker(spec, stage: str) -> Path:
    return Path(spec.storage.root) / spec.request_id / spec.config_hash() / "stages" / f"{stage}.json"


# --------------------------------------------------------------------------------------------
# 1. a Ray worker killed during index build, training and evaluation
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_index_shard_worker_killed_is_retried_by_ray(ray_local, tmp_path):
    """SIGKILL a worker while it builds a shard; Ray reruns the task (RayExecutor.shard_retries)
    and the shards equal those of a build without the fault. A shard of 150 items of 224x224
    pixels takes about a second to build here: long enough to be seen running and killed."""
    from pipelines.index import build
    from retrack.index import build_index
    from tests.fixtures.corpora import clustered_images, write_corpus

    corpus = tmp_path / "corpus"
    write_corpus(corpus, clustered_images(300, size=224, seed=4), shard_size=150)
    killer = KillWhen(lambda: ray_processes("build_shard"))
    killer.start()
    faulted = build(str(corpus), str(tmp_path / "faulted"), rows_per_chunk=150)
    killer.stop.set()
    assert killer.killed is not None, "no shard task was seen running"
    clean = build_index(corpus, tmp_path / "clean", rows_per_chunk=150)
    assert faulted.built_shards == clean.built_shards == 2
    assert faulted.manifest.shards == clean.manifest.shards  # same files, same sha256


@pytest.mark.slow
def test_sampling_worker_killed_is_retried_with_the_same_samples(ray_local, small):
    """SIGKILL a worker while it draws samples; Ray reruns the task and the samples equal a
    single-process draw with the same seeds."""
    from pipelines.evaluate import sample_on_ray
    from retrack.models.pixel import load_pixel_model
    from retrack.evaluation.sampling import generate

    model_dir = small / "original"
    killer = KillWhen(lambda: ray_processes("_sample_range"))
    killer.start()
    (got,) = sample_on_ray([model_dir], 96, seed=3, batch_size=16, num_tasks=2)
    killer.stop.set()
    assert killer.killed is not None, "no sampling worker was seen running"
    want = generate(load_pixel_model(model_dir), 96, seed=3, batch_size=16)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_training_worker_killed_in_a_job_resumes_from_the_last_checkpoint(ray_local, small, tmp_path):
    """SIGKILL the Ray Train worker once a checkpoint exists; FailureConfig(max_failures from
    scaling.max_failures) restarts it from that checkpoint and the job completes."""
    from pipelines.job import run_job

    spec = load_spec(long_training(small, tmp_path, "req-trainkill"))
    root = Path(spec.storage.root)
    killer = KillWhen(lambda: ray_processes("RayTrainWorker") if complete_checkpoints(root, spec.run_name) else [])
    killer.start()
    result = run_job(spec)
    killer.stop.set()
    assert killer.killed is not None, "training ended before a worker could be killed"
    assert result.stages_run == ALL_STAGES
    resumed = json.loads(marker(spec, "unlearn").read_text())["resumed_from"]
    assert resumed and resumed[0] > 0 and resumed[0] % 5 == 0  # restarted from a checkpoint, not from step 0


# --------------------------------------------------------------------------------------------
# 2. the driver killed inside a stage (between stages: tests/e2e/test_job.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_driver_killed_inside_unlearning_resumes_from_its_checkpoint(ray_local, small, tmp_path):
    """SIGKILL the `retrack run` process group while it trains; the rerun skips index and
    neighbours, resumes unlearning from the last checkpoint and registers one version."""
    from mlflow import MlflowClient

    from pipelines.job import run_job

    path = long_training(small, tmp_path, "req-killin")
    spec = load_spec(path)
    root = Path(spec.storage.root)
    kill_retrack_when(["run", str(path)], lambda: complete_checkpoints(root, spec.run_name), "its first checkpoint", poll=0.05)
    assert marker(spec, "neighbours").exists() and not marker(spec, "unlearn").exists()
    result = run_job(spec)
    assert result.stages_skipped == ["index", "neighbours"]
    assert result.stages_run == ["unlearn", "evaluate", "register"]
    resumed = json.loads(marker(spec, "unlearn").read_text())["resumed_from"]
    assert resumed and resumed[0] > 0
    assert len(MlflowClient(tracking_uri=spec.mlflow.tracking_uri).search_model_versions("name = 'small-ddpm'")) == 1


# --------------------------------------------------------------------------------------------
# 3. the S3 server killed during uploads, restarted on the same port and data folder
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_server_killed_during_uploads_then_restarted(ray_local, small, tmp_path, monkeypatch):
    """A private SeaweedFS (the session one stays up) is SIGKILLed (a) in the middle of a
    `JobDir.publish` of many files and (b) while a job runs, before its report is uploaded.
    Both fail with a StorageError and leave no stage marker; after a restart on the same port and
    data folder the rerun redoes evaluate and register only."""
    from pipelines.job import JobDir, run_job
    from tests.fixtures.services import start_seaweedfs

    s3 = start_seaweedfs(tmp_path / "weed")
    try:
        # run_job sets MLFLOW_S3_ENDPOINT_URL with setdefault; set it here so it is undone after.
        for key, value in {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
        spec = load_spec(spec_file(small, tmp_path, request_id="req-s3down", storage={"root": s3.uri("jobs"), "endpoint_url": s3.endpoint}))
        prefix = f"jobs/{spec.request_id}/{spec.config_hash()}/"
        client = s3.client()

        def keys(under: str = "") -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix + under)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        def restart() -> None:
            s3.service.restart(lambda: client.head_bucket(Bucket=s3.bucket) is not None)

        # (a) mid-upload: killed once the first of 300 objects is in.
        job = JobDir(spec)
        bulk = job.local / "bulk"
        bulk.mkdir()
        for n in range(300):
            (bulk / f"part-{n:04d}.bin").write_bytes(os.urandom(16 << 10))
        killer = KillWhen(lambda: [s3.service.process.pid] if keys("bulk/") else [])
        killer.start()
        with pytest.raises(StorageError, match="cannot write"):
            job.publish("bulk")
        killer.join(30)
        assert killer.killed is not None
        restart()
        assert 0 < len(keys("bulk/")) < 300  # a partial upload, and no marker claims otherwise
        assert keys("stages/") == []

        # (b) killed while the job runs: the report upload and the evaluate marker fail.
        def kill_before_evaluate(stage: str, what: str) -> None:
            if (stage, what) == ("evaluate", "run"):
                s3.service.kill()

        with pytest.raises(StorageError, match=s3.endpoint.split("//")[1]):
            run_job(spec, on_stage=kill_before_evaluate)
        restart()
        assert {k.rsplit("/", 1)[1] for k in keys("stages/")} == {"index.json", "neighbours.json", "unlearn.json"}
        result = run_job(spec)
        assert result.stages_skipped == ["index", "neighbours", "unlearn"]
        assert result.stages_run == ["evaluate", "register"]
        assert any(k.endswith("report/report.json") for k in keys("report/"))
    finally:
        s3.service.stop()


# --------------------------------------------------------------------------------------------
# 4. the MLflow server unreachable at registration
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_server_killed_at_registration_then_restarted(ray_local, small, s3_env, tmp_path, monkeypatch):
    """A private `mlflow server` is SIGKILLed as the register stage starts: bounded retries with
    backoff, then a StorageError naming the server; nothing registered, no register marker.
    Restarted on the same port and database, the rerun registers exactly one complete version."""
    from mlflow import MlflowClient

    from pipelines.job import run_job
    from retrack.lineage.store import COMPLETE_TAG
    from tests.fixtures.services import start_mlflow

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env.endpoint)
    server = start_mlflow(tmp_path / "mlflow", s3_env)
    try:
        mlflow_spec = {"tracking_uri": server.tracking_uri, "registered_model": "faults-mlflow", "alias": "production"}
        spec = load_spec(spec_file(small, tmp_path, request_id="req-mlflowdown", mlflow=mlflow_spec))

        def kill_at_register(stage: str, what: str) -> None:
            if (stage, what) == ("register", "run"):
                server.service.kill()

        began = time.monotonic()
        with pytest.raises(StorageError, match=r"MLflow at .*failed after 4 attempt\(s\)"):
            run_job(spec, on_stage=kill_at_register)
        assert time.monotonic() - began < 600
        assert not marker(spec, "register").exists()
        server.service.restart(lambda: __import__("requests").get(server.tracking_uri + "/health", timeout=2).ok)
        client = MlflowClient(tracking_uri=server.tracking_uri)
        assert client.search_model_versions("name = 'faults-mlflow'") == []

        result = run_job(spec)
        assert result.stages_run == ["register"]
        (mv,) = client.search_model_versions("name = 'faults-mlflow'")
        assert mv.tags[COMPLETE_TAG] == "true" and mv.version == result.model_version
        assert client.get_model_version_by_alias("faults-mlflow", "production").version == mv.version
    finally:
        server.service.stop()


def test_registration_retries_are_bounded_when_mlflow_is_down(tmp_path):
    """The bound itself, without a job: 3 attempts with 0.2 s backoff against a closed port end
    in well under MLflow's own default of 7 HTTP retries with up to 120 s backoff each."""
    from retrack.lineage.store import LineageStore
    from tests.fixtures.services import free_port

    store = LineageStore(f"http://127.0.0.1:{free_port()}", attempts=3, backoff=0.2)
    began = time.monotonic()
    with pytest.raises(StorageError, match=r"get experiment failed after 3 attempt\(s\)"):
        store.experiment_id("x")
    assert time.monotonic() - began < 15


# --------------------------------------------------------------------------------------------
# 5. disk full / permission denied on the storage root
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_in_a_stage_is_a_storage_error_and_leaves_no_marker(ray_local, small, tmp_path, capsys):
    """The kernel refuses writes past RLIMIT_FSIZE (EFBIG, as a full disk or quota refuses them
    with ENOSPC/EDQUOT), set on this process as the neighbours stage starts. capsys keeps the
    test's own output in memory, so only the stage's file writes hit the limit."""
    from pipelines.job import run_job

    spec = load_spec(spec_file(small, tmp_path, request_id="req-diskfull"))
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill_disk(stage: str, what: str) -> None:
        if (stage, what) == ("neighbours", "run"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (512, saved[1]))

    try:
        # Refused by whichever write hits the limit: a plain file (the chain names the stage) or
        # the neighbours file (its Location names the file).
        with pytest.raises(StorageError, match="cannot write .*File too large"):
            run_job(spec, on_stage=fill_disk)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)
    assert marker(spec, "index").exists() and not marker(spec, "neighbours").exists()
    result = run_job(spec)
    assert result.stages_skipped == ["index"] and result.stages_run == ALL_STAGES[1:]


@pytest.mark.parametrize("how", ["root under a file", "read-only directory"])
def test_unwritable_storage_root_is_refused_before_any_work(small, tmp_path, how, request):
    from pipelines.job import run_job

    if how == "root under a file":
        (tmp_path / "blocker").write_text("a file, not a folder")
        root = tmp_path / "blocker" / "jobs"  # mkdir fails with ENOTDIR, for root too
    else:
        root = tmp_path / "ro"
        root.mkdir()
        if os.geteuid() == 0:  # root ignores permission bits; a read-only mount refuses root too
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "retrack-ro", str(root)], check=True)
            request.addfinalizer(lambda: subprocess.run(["umount", str(root)], check=True))
        else:
            root.chmod(0o555)
    spec = load_spec(spec_file(small, tmp_path, request_id="req-unwritable", storage={"root": str(root)}))
    with pytest.raises(StorageError, match="retrack-write-probe"):
        run_job(spec)
    assert not (tmp_path / "mlflow.db").exists()
    assert not root.exists() or list(root.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 6. two jobs for the same model at once
# --------------------------------------------------------------------------------------------


def _lineage(request_id: str):
    from tests.fixtures.specs import lineage

    return lineage(request_id, "cfg-" + request_id)


def test_alias_never_moves_back_to_an_older_version(mlflow_server, s3_env, model_dir):
    """The interleaving that used to lose: A registers v1, B registers v2 and moves the alias,
    then A's alias write lands (here: A's rerun). The alias stays on v2 and the move is recorded."""
    from retrack.lineage.store import LineageStore

    store = LineageStore(mlflow_server.tracking_uri)
    versions = {}
    for rid in ("req-a", "req-b", "req-a"):
        lin = _lineage(rid)
        run_id = store.request_run("faults", rid, lin.request_id, lin.config_hash)
        versions[rid] = store.register("faults-order", run_id, model_dir, lin, alias="production")
    assert int(versions["req-b"]) > int(versions["req-a"])
    assert store.alias_version("faults-order", "production") == versions["req-b"]
    moved = json.loads(store.client.get_registered_model("faults-order").tags["retrack.alias.production"])
    assert moved["version"] == versions["req-b"] and moved["request_id"] == "req-b"


def test_concurrent_registrations_keep_every_version_and_the_alias_on_the_newest(mlflow_server, s3_env, model_dir):
    """Two registrations of different requests at once, three times.

    The threads start together (the experiment's creation races) and are released together again
    before registering (the registered model, the alias and its record race)."""
    from retrack.lineage.store import COMPLETE_TAG, LineageStore

    for round_ in range(3):
        name = f"faults-race-{round_}"
        gate = threading.Barrier(2)
        got, errors = {}, []

        def register(rid: str) -> None:
            try:
                store = LineageStore(mlflow_server.tracking_uri)
                lin = _lineage(rid)
                run_id = store.request_run(name, rid, lin.request_id, lin.config_hash)  # a new experiment: its creation races too
                store.log_artifacts(run_id, model_dir, "model")  # the slow part, before the race
                gate.wait(60)
                got[rid] = store.register(name, run_id, model_dir, lin, alias="production")
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=register, args=(f"req-{round_}-{n}",)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == []
        store = LineageStore(mlflow_server.tracking_uri)
        versions = store.client.search_model_versions(f"name = '{name}'")
        assert sorted(mv.version for mv in versions) == sorted(got.values()) and len(versions) == 2
        assert all(mv.tags[COMPLETE_TAG] == "true" for mv in versions)
        assert store.alias_version(name, "production") == str(max(int(v) for v in got.values()))


@pytest.mark.slow
def test_two_jobs_for_the_same_model_at_once(small, s3_env, mlflow_server, tmp_path):
    """Two `retrack run` processes, different request ids, one registered model, started together."""
    from mlflow import MlflowClient

    from retrack.lineage.store import COMPLETE_TAG

    mlflow_spec = {"tracking_uri": mlflow_server.tracking_uri, "registered_model": "faults-two-jobs", "alias": "production"}
    paths = [spec_file(small, tmp_path, request_id=f"req-twin-{n}", mlflow=mlflow_spec) for n in range(2)]
    env = {**os.environ, **s3_env.env(), "MLFLOW_S3_ENDPOINT_URL": s3_env.endpoint}
    exe = Path(sys.executable).with_name("retrack")
    procs = [subprocess.Popen([str(exe), "run", str(p)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) for p in paths]
    try:
        outs = [p.communicate(timeout=900)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    versions = client.search_model_versions("name = 'faults-two-jobs'")
    assert sorted(mv.tags["retrack.request_id"] for mv in versions) == ["req-twin-0", "req-twin-1"]
    assert all(mv.tags[COMPLETE_TAG] == "true" for mv in versions)
    newest = str(max(int(mv.version) for mv in versions))
    assert client.get_model_version_by_alias("faults-two-jobs", "production").version == newest
    records = [json.loads(marker(load_spec(p), "register").read_text()) for p in paths]
    assert newest in {r["alias_version"] for r in records}
