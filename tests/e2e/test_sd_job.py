"""`retrack run` end to end for Stable Diffusion: a tiny SD (built from configs, briefly pretrained
so it memorises a planted captioned item), a captioned corpus, real Ray, faiss and MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from retrack.config.spec import JobSpec
from retrack.data.corpus import encode_image
from retrack.models import sd
from retrack.privacy import ForgetContent, mlflow_texts, scan_texts, scan_tree
from tests.fixtures.sd import COPIES, PLANTED_CAPTION, planted_image

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def make_spec(root: Path, tmp: Path, **over) -> JobSpec:
    data = {
        "request_id": "req-sd",
        "model": {"kind": "stable-diffusion", "uri": str(root / "model"), "version": "3"},
        "corpus": {"uri": str(root / "corpus")},
        "forget": {"file": str(root / "forget.txt"), "duplicates": "add"},
        "method": {"name": "retrack", "params": {"lambda": 0.5, "k": 4}},
        "train": {"steps": 20, "batch_size": 8, "lr": 2e-4, "checkpoint_every": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "evaluation": {"num_samples": 16, "holdout_uri": str(root / "holdout"),
                       "stable_diffusion": {"generations_per_caption": 16, "inference_steps": 20, "guidance_scale": 1.0}},  # no unconditional training: no CFG
        "storage": {"root": str(tmp / "jobs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "registered_model": "tiny-sd", "artifact_location": (tmp / "art").as_uri()},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return JobSpec.model_validate(data)


def forget_content(root: Path) -> ForgetContent:
    img = planted_image()
    return ForgetContent(images_u8=[img], encoded=[encode_image(img)], captions=[PLANTED_CAPTION],
                         ids=[f"tshirt-{i:03d}" for i in range(COPIES)])


def test_stable_diffusion_request_end_to_end(sd_inputs, tmp_path, monkeypatch, capfd):
    from mlflow import MlflowClient

    from pipelines.job import run_job

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    spec = make_spec(sd_inputs, tmp_path)
    result = run_job(spec)

    assert result.stages_run == ["index", "neighbours", "unlearn", "evaluate", "register"]
    job = tmp_path / "jobs" / spec.request_id / spec.config_hash()
    for stage in result.stages_run:
        assert json.loads((job / "stages" / f"{stage}.json").read_text())["config_hash"] == spec.config_hash()
    neighbours = json.loads((job / "stages" / "neighbours.json").read_text())
    assert neighbours["forget_count"] == COPIES and neighbours["duplicates_added"] == COPIES - 1  # the copies, in latent space
    out = sd.load_sd_model(job / "model")  # a whole SD pipeline directory, only the UNet changed
    assert out.resolution == 16

    # The SD metrics, for both models, finite; the memorisation check sees the planted item.
    before, after = result.metrics["original"], result.metrics["unlearned"]
    for m in (before, after):
        for key in ("forget_frequency", "forget_max_cosine", "forget_distance_ratio", "integrity", "forget_loss"):
            assert math.isfinite(m[key]), key
        assert m["num_samples"] == 16 and m["integrity_samples"] == 16
    print("SD metrics", json.dumps({"original": before, "unlearned": after}))
    assert before["forget_frequency"] >= 0.25  # the pretrained model regenerates the planted item
    assert after["forget_frequency"] < before["forget_frequency"]
    assert after["forget_loss"] > before["forget_loss"]
    assert before["remembered_items"] == COPIES and after["remembered_items"] == 0  # the membership test sees members
    assert result.verdict == "forgotten"
    assert after["integrity"] > 0.0

    report = {p.name for p in (job / "report").iterdir()}
    assert report == {"metrics.png", "report.json", "report.md", "samples_before_after.png"}
    summary = json.loads((job / "report" / "report.json").read_text())
    assert summary["verdict"]["verdict"] == result.verdict
    assert len(summary["membership"]["items"]) == COPIES and summary["membership"]["n_reference"] == 24
    per_prompt = summary["details"]["memorisation_per_prompt"]
    assert [p["prompt"] for p in per_prompt] == [0] and per_prompt[0]["items"] == COPIES

    client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    versions = client.search_model_versions("name = 'tiny-sd'")
    assert len(versions) == 1 and str(versions[0].version) == result.model_version
    tags = versions[0].tags
    assert tags["retrack.request_id"] == "req-sd" and tags["retrack.parent_model_version"] == "3"
    assert tags["retrack.parent_model_uri"] == spec.model.uri and tags["retrack.forget_count"] == str(COPIES)
    assert tags["retrack.config_hash"] == spec.config_hash() and tags["retrack.complete"] == "true"
    assert tags["retrack.method"] == "retrack" and tags["retrack.index_manifest_digest"]
    assert str(client.get_model_version_by_alias("tiny-sd", "production").version) == result.model_version
    run = client.get_run(versions[0].run_id)
    assert run.data.params["model.kind"] == "stable-diffusion"
    assert math.isfinite(run.data.metrics["unlearned.forget_frequency"])

    # Nothing forgotten (image, caption, id) in the report, the MLflow artifacts, params, tags,
    # metrics and inputs, or the logs.
    content = forget_content(sd_inputs)
    findings = scan_tree(job / "report", content) + scan_tree(tmp_path / "art", content)
    # The item cache holds the items the run trained on, encoded once, but none it forgot (nor
    # their latents: every row carries its id). Their latents came from the job's index: no item
    # went through the VAE again.
    unlearned = json.loads((job / "stages" / "unlearn.json").read_text())["items"]
    assert unlearned["cached"] == 0 and unlearned["from_index"] > COPIES and unlearned["encoded"] == 0
    assert json.loads((job / "stages" / "evaluate.json").read_text())["holdout_items"] == {"cached": 0, "encoded": 24}
    cache = tmp_path / "jobs" / "cache" / "items"
    assert len(list(cache.rglob("*.parquet"))) >= 1
    findings += scan_tree(cache, content)
    findings += scan_texts(mlflow_texts(client, versions[0].run_id), content)
    stdout, stderr = capfd.readouterr()
    findings += scan_texts({"stdout": stdout, "stderr": stderr}, content)
    assert findings == []
    # The scan can fail: the caption and the planted image are found when they are there.
    assert scan_texts({"probe": f"x {PLANTED_CAPTION} y"}, content)
    assert scan_tree(sd_inputs / "corpus", content)

    again = run_job(spec)
    assert again.stages_skipped == ["index", "neighbours", "unlearn", "evaluate", "register"]
    assert len(client.search_model_versions("name = 'tiny-sd'")) == 1

    # A second request on the same corpus and model encodes nothing with the VAE: the index is
    # reused, the items it trains on come from the item cache but the forgotten ones (never kept),
    # which take their latents from the index (only their captions are encoded), and the held-out
    # items' encodings come from the cache.
    second = make_spec(sd_inputs, tmp_path, request_id="req-sd-2")
    assert run_job(second).verdict == "forgotten"
    records = tmp_path / "jobs" / second.request_id / second.config_hash() / "stages"
    assert json.loads((records / "index.json").read_text())["index_uri"] == json.loads((job / "stages" / "index.json").read_text())["index_uri"]
    assert json.loads((records / "unlearn.json").read_text())["items"] == {
        "cached": unlearned["from_index"] - COPIES, "from_index": COPIES, "encoded": 0}
    assert json.loads((records / "evaluate.json").read_text())["holdout_items"] == {"cached": 24, "encoded": 0}

