"""`retrack run` against real services on loopback: SeaweedFS (S3) for the model, corpus, job
storage and MLflow artifacts, and an `mlflow server` with a SQLite backend."""

from __future__ import annotations

from pathlib import Path

import pytest

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
                     "verdict", "audit.record"}  # the last two: the audit trail (retrack/audit.py)
    assert {k.removeprefix("retrack.") for k in mv.tags if k.startswith("retrack.")} == expected_tags
    assert mv.tags["retrack.parent_model_uri"] == small_on_s3["model"] and mv.tags["retrack.parent_model_version"] == "1"
    assert int(mv.tags["retrack.forget_count"]) >= len(read_forget_ids(small_on_s3["root"] / "bench" / "forget_ids.txt"))
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
