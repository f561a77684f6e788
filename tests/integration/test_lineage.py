"""Lineage against a real MLflow server with an S3 (SeaweedFS) artifact store."""

from __future__ import annotations

import pytest

from retrack.errors import StorageError
from retrack.lineage.store import COMPLETE_TAG, LineageStore, check_tracking_server
from tests.fixtures.specs import lineage

pytestmark = pytest.mark.integration


def test_register_tags_alias_artifacts_and_idempotent_rerun(mlflow_server, s3_env, model_dir):
    store = LineageStore(mlflow_server.tracking_uri)
    lin = lineage()
    run_id = store.request_run("retrack-test", "req-1-abc123", lin.request_id, lin.config_hash)
    store.log_inputs(run_id, {"corpus": ("s3://b/corpus", "c" * 64, 1666), "forget": ("retrack://forget-set", lin.forget_ids_digest, 50)})
    version = store.register("digits-ddpm", run_id, model_dir, lin, alias="production")
    mv = store.client.get_model_version("digits-ddpm", version)
    for key, value in lin.tags().items():
        assert mv.tags[key] == value
    assert mv.tags[COMPLETE_TAG] == "true"
    assert store.client.get_model_version_by_alias("digits-ddpm", "production").version == version
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="mlflow-artifacts/")["Contents"]}
    assert any(k.endswith("model/unet/diffusion_pytorch_model.safetensors") for k in keys)
    inputs = store.client.get_run(run_id).inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} == {"corpus", "forget"}
    # Rerun of the same request: same run, same version, still one version.
    assert store.request_run("retrack-test", "req-1-abc123", lin.request_id, lin.config_hash) == run_id
    assert store.register("digits-ddpm", run_id, model_dir, lin, alias="production") == version
    assert len(store.client.search_model_versions("name = 'digits-ddpm'")) == 1


def test_incomplete_version_is_replaced_and_alias_only_moves_last(mlflow_server, s3_env, model_dir):
    store = LineageStore(mlflow_server.tracking_uri)
    lin = lineage("req-2", "def456")
    run_id = store.request_run("retrack-test", "req-2", lin.request_id, lin.config_hash)
    store.client.create_registered_model("crashy")
    source = store.client.get_run(run_id).info.artifact_uri + "/model"
    half = store.client.create_model_version("crashy", source=source, run_id=run_id, tags=lin.tags())  # crash before "complete"
    assert store.complete_version("crashy", lin) is None
    version = store.register("crashy", run_id, model_dir, lin, alias="production")
    assert version != half.version
    remaining = [mv.version for mv in store.client.search_model_versions("name = 'crashy'")]
    assert remaining == [version]


def test_a_version_that_was_not_promoted_never_takes_the_alias(mlflow_server, s3_env, model_dir):
    """v1 promoted; v2 registered with its failed outcome and no alias: the alias stays on v1. A
    later move by another job (an older request's rerun) does not jump to v2 either, although v2
    is the highest complete version; a promoted v3 then takes it."""
    store = LineageStore(mlflow_server.tracking_uri)
    versions = {}
    for rid, outcome in (("req-p1", "promoted"), ("req-n2", "not_forgotten"), ("req-p3", "promoted")):
        lin = lineage(rid, "hash-" + rid)
        run_id = store.request_run("retrack-test", rid, lin.request_id, lin.config_hash)
        promoted = outcome == "promoted"
        versions[rid] = store.register("gated", run_id, model_dir, lin, "production" if promoted else None,
                                       tags={"outcome": outcome, "gate": "passed"})
        if rid == "req-n2":
            mv = store.client.get_model_version("gated", versions[rid])
            assert (mv.tags["retrack.outcome"], mv.tags[COMPLETE_TAG]) == ("not_forgotten", "true")
            assert store.alias_version("gated", "production") == versions["req-p1"]
            assert store.move_alias("gated", "production", versions["req-p1"], "req-p1") == versions["req-p1"]
    assert store.alias_version("gated", "production") == versions["req-p3"]
    assert len(store.client.search_model_versions("name = 'gated'")) == 3


def test_unreachable_tracking_server_fails_fast():
    with pytest.raises(StorageError, match="127.0.0.1:9 is unreachable"):
        check_tracking_server("http://127.0.0.1:9", timeout=2)
