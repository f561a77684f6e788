"""`retrack run` against real services on loopback: SeaweedFS (S3) for the model, corpus, job
storage and MLflow artifacts, and an `mlflow server` with a SQLite backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retrack.data.corpus import decode_image, iter_rows
from retrack.data.forget import read_forget_ids
from retrack.errors import StorageError
from retrack.privacy import ForgetContent, mlflow_texts, scan_blob, scan_texts
from retrack.config.spec import JobSpec
from tests.fixtures.specs import s3_job_spec

pytestmark = pytest.mark.integration


def make_spec(inputs, s3, mlflow_uri, request_id: str = "req-s3", **over) -> JobSpec:
    return JobSpec.model_validate(s3_job_spec(inputs, s3, mlflow_uri, request_id, **over))


def forget_content(root: Path) -> ForgetContent:
    forget = set(read_forget_ids(root / "bench" / "forget_ids.txt"))
    rows = [r for r in iter_rows(root / "bench" / "corpus") if r["id"] in forget]
    return ForgetContent(images_u8=[decode_image(rows[0]["image"])], encoded=[rows[0]["image"]], ids=sorted(forget))


def test_run_on_s3_and_mlflow_server(small_on_s3, s3_env, mlflow_server, monkeypatch, tmp_path, capfd):
    from mlflow import MlflowClient

    from pipelines.job import run_job

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    spec = make_spec(small_on_s3, s3_env, mlflow_server.tracking_uri)
    result = run_job(spec)
    assert result.stages_run == ["index", "neighbours", "unlearn", "evaluate", "register"]
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    mv = client.get_model_version("small-ddpm-s3", result.model_version)
    expected_tags = {"request_id", "config_hash", "parent_model_uri", "parent_model_version", "forget_ids_digest", "forget_count",
                     "index_manifest_digest", "method", "method_params", "code_version", "model_digest", "complete",
                     "verdict", "outcome", "gate",  # the promotion decision (retrack/evaluation/verdict.py)
                     "audit.record"}  # the audit trail (retrack/audit.py)
    assert {k.removeprefix("retrack.") for k in mv.tags if k.startswith("retrack.")} == expected_tags
    assert mv.tags["retrack.parent_model_uri"] == small_on_s3["model"] and mv.tags["retrack.parent_model_version"] == "1"
    assert int(mv.tags["retrack.forget_count"]) >= len(read_forget_ids(small_on_s3["root"] / "bench" / "forget_ids.txt"))
    # Forgotten within the quality gate: promoted, the alias moved to the new version.
    assert (result.verdict, result.outcome, mv.tags["retrack.outcome"], mv.tags["retrack.gate"]) == ("forgotten", "promoted", "promoted", "passed")
    assert client.get_model_version_by_alias("small-ddpm-s3", "production").version == mv.version
    keys = [o["Key"] for page in s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=s3_env.bucket) for o in page.get("Contents", [])]
    assert any(k.startswith("mlflow-artifacts/") and k.endswith("model/unet/diffusion_pytorch_model.safetensors") for k in keys)
    assert any(k.startswith("mlflow-artifacts/") and k.endswith("report/report.json") for k in keys)
    assert any(k.startswith(f"jobs/req-s3/{spec.config_hash()}/stages/register.json") for k in keys)

    again = run_job(spec)
    assert again.stages_skipped == ["index", "neighbours", "unlearn", "evaluate", "register"]
    assert again.model_version == result.model_version
    assert len(client.search_model_versions("name = 'small-ddpm-s3'")) == 1

    # Privacy: nothing forgotten in MLflow artifacts, params, tags, metrics, inputs, reports or logs.
    content = forget_content(small_on_s3["root"])
    findings = []
    s3c = s3_env.client()
    for k in keys:
        if k.startswith("mlflow-artifacts/") or "/report/" in k:
            findings += scan_blob(s3c.get_object(Bucket=s3_env.bucket, Key=k)["Body"].read(), k, content)
    findings += scan_texts(mlflow_texts(client, mv.run_id), content)
    out, err = capfd.readouterr()
    findings += scan_texts({"stdout": out, "stderr": err}, content)
    assert findings == []
    # The scan itself can fail: the forget image bytes are found when they are there.
    assert scan_blob(b"xx" + content.encoded[0] + b"yy", "probe", content)


def test_bucket_without_permission_and_unreachable_tracking_fail_before_training(small_on_s3, s3_env, mlflow_server, monkeypatch, tmp_path):
    from pipelines.job import run_job

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    spec = make_spec(small_on_s3, s3_env, mlflow_server.tracking_uri, request_id="req-denied", storage={"root": "s3://no-such-bucket-retrack/jobs"})
    with pytest.raises(StorageError, match="no-such-bucket-retrack"):
        run_job(spec)
    spec = make_spec(small_on_s3, s3_env, "http://127.0.0.1:9", request_id="req-nomlflow")
    with pytest.raises(StorageError, match="127.0.0.1:9 is unreachable"):
        run_job(spec)
    assert not (tmp_path / "home" / "jobs").exists()


@pytest.fixture(scope="module")
def memorising_inputs(seaweedfs_s3, bench, memorising_model):
    """The embedded benchmark and its memorising original (the planted digit in ~3% of samples) on S3."""
    seaweedfs_s3.client().put_object(Bucket=seaweedfs_s3.bucket, Key="requests/req-gate/forget_ids.txt", Body=bench.forget_ids.read_bytes())
    return {
        "model": seaweedfs_s3.upload_dir(memorising_model, "models/digits-quick"),
        "corpus": seaweedfs_s3.upload_dir(bench.corpus, "datasets/digits"),
        "holdout": seaweedfs_s3.upload_dir(bench.holdout, "datasets/digits-holdout"),
        "forget": seaweedfs_s3.uri("requests/req-gate/forget_ids.txt"),
    }


@pytest.mark.slow
def test_a_run_that_did_not_forget_is_registered_without_the_alias_and_exits_3(memorising_inputs, memorising_model, s3_env, mlflow_server,
                                                                                monkeypatch, tmp_path):
    """Two updates cannot make the memorising model forget its planted digit. `retrack run`
    registers the version with its failed verdict, leaves the alias on the version it was on,
    records the attempt as failed, says why and exits 3; a rerun (a RayJob's retry) decides the
    same from the stage records and moves nothing."""
    from mlflow import MlflowClient

    from pipelines.cli.exit_codes import ExitCode
    from pipelines.job import run_job
    from retrack.audit import AuditLog
    from retrack.lineage.store import LineageStore
    from retrack.storage.location import Location
    from tests.fixtures.specs import lineage

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    name = "digits-gate"
    store = LineageStore(mlflow_server.tracking_uri)
    earlier = lineage("req-earlier", "earlier")  # a promoted version holds the alias
    before = store.register(name, store.request_run("retrack", "req-earlier", earlier.request_id, earlier.config_hash), memorising_model, earlier,
                            "production", tags={"outcome": "promoted", "gate": "passed"})
    spec = make_spec(memorising_inputs, s3_env, mlflow_server.tracking_uri, request_id="req-gate",
                     method={"name": "retrack", "params": {"lambda": 0.05, "k": 10}}, train={"steps": 2, "batch_size": 8},
                     evaluation={"num_samples": 128, "holdout_uri": memorising_inputs["holdout"]},
                     mlflow={"registered_model": name, "alias": "production"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_env.endpoint}  # AWS_* and RETRACK_HOME set above
    proc = subprocess.run([str(Path(sys.executable).with_name("retrack")), "run", str(path)], env=env, capture_output=True, text=True, timeout=1500)
    shown = proc.stdout + proc.stderr
    assert proc.returncode == ExitCode.NOT_FORGOTTEN == 3, shown[-4000:]
    assert "verdict: not forgotten" in shown and "promoted: no (not forgotten)" in shown
    assert "forget frequency" in shown or "still have a denoising loss below" in shown  # the reason, in numbers

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    assert client.get_model_version_by_alias(name, "production").version == before
    (mv,) = [v for v in client.search_model_versions(f"name = '{name}'") if v.version != before]
    assert (mv.tags["retrack.verdict"], mv.tags["retrack.outcome"], mv.tags["retrack.complete"]) == ("not forgotten", "not_forgotten", "true")
    record = (Location.parse(spec.storage.root, endpoint=s3_env.endpoint) / "req-gate" / spec.config_hash() / "stages" / "register.json").read_json()
    assert (record["promoted"], record["outcome"], record["model_version"], record["alias_version"]) == (False, "not_forgotten", mv.version, before)
    assert record["reasons"]
    (attempt,) = AuditLog(spec.storage.root, s3_env.endpoint).attempts("req-gate")
    assert (attempt.status, attempt.outcome, attempt.error, attempt.model["version"]) == ("failed", "not_forgotten", None, mv.version)

    again = run_job(spec)
    assert (again.outcome, again.model_version, again.stages_run) == ("not_forgotten", mv.version, [])
    assert client.get_model_version_by_alias(name, "production").version == before
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
