"""`retrack run` end to end for Stable Diffusion: a tiny SD (built from configs, briefly pretrained
so it memorises a planted captioned item), a captioned corpus, real Ray, faiss and MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retrack.config.spec import JobSpec
from retrack.data.corpus import encode_image, write_shards
from retrack.embedded.benchmark import load_digits_u8
from retrack.models import clip, sd
from retrack.models.latents import encode_latents, sd_pixels
from retrack.models.schedule import NoiseSchedule
from retrack.privacy import ForgetContent, mlflow_texts, scan_texts, scan_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PLANTED_CAPTION = "a red t-shirt with a blue cross, studio photo"
COPIES = 6
PRETRAIN_STEPS = 300


def planted_image() -> np.ndarray:
    img = np.zeros((16, 16, 3), np.uint8)
    img[2:14, 3:13, 0] = 220
    img[7:9, :, 2] = 255
    img[:, 7:9, 2] = 255
    return img


def digit_rgb16(d: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(np.repeat(d[:, :, None], 3, 2), 2, 0), 2, 1)


def tiny_captioned_sd(images: np.ndarray, captions: list[str], steps: int) -> sd.StableDiffusion:
    """tiny_sd with two changes that make a 3M-parameter model behave like a trained SD in latent
    space, then `steps` of plain conditional DDPM training on the corpus:
    - a tight VAE posterior (a trained VAE's latent std is small; at init it is ~1 and drowns
      the image in the sampled latent), and
    - SD's rule for the latent scaling factor: unit variance of the corpus latents."""
    model = sd.tiny_sd(16, seed=0)
    with torch.no_grad():
        model.vae.quant_conv.weight[4:] = 0.0  # the log-variance half of the posterior
        model.vae.quant_conv.bias[4:] = -12.0
        pixels = sd_pixels(images, 16)
        model.vae.register_to_config(scaling_factor=float(1.0 / model.vae.encode(pixels).latent_dist.mean.std()))
    latents = encode_latents(model.vae, images, list(range(len(images))), 16)
    cond = sd.encode_captions(model.text_encoder, clip.tokenize(model.tokenizer, captions))
    schedule = NoiseSchedule.from_scheduler(model.scheduler)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.unet.train()
    for _ in range(steps):
        rows = torch.randint(0, len(latents), (16,), generator=gen)
        t, eps = schedule.sample_t(16, gen), torch.randn(latents[rows].shape, generator=gen)
        pred = model.unet(schedule.add_noise(latents[rows], t, eps), t, encoder_hidden_states=cond[rows]).sample
        (pred - eps).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.unet.eval()
    return model


@pytest.fixture(scope="module")
def sd_inputs(tmp_path_factory):
    """64 captioned digits plus one planted (image, caption) pair copied 6 times (~9%); 24 other
    captioned digits held out; the model pretrained on the corpus."""
    root = tmp_path_factory.mktemp("sdjob")
    build_inputs(root)
    return root


def build_inputs(root: Path) -> None:
    torch.set_num_threads(1)  # 2 cores shared with Ray: more threads only contend
    digits, labels = load_digits_u8()
    images = [digit_rgb16(digits[i]) for i in range(64)] + [planted_image()] * COPIES
    captions = [f"a handwritten digit {labels[i]}" for i in range(64)] + [PLANTED_CAPTION] * COPIES
    ids = [f"digit-{i:04d}" for i in range(64)] + [f"tshirt-{i:03d}" for i in range(COPIES)]
    write_shards(root / "corpus", [{"id": i, "image": encode_image(x), "caption": c} for i, x, c in zip(ids, images, captions)], shard_size=32)
    write_shards(root / "holdout", [{"id": f"held-{i:04d}", "image": encode_image(digit_rgb16(digits[i])), "caption": f"a handwritten digit {labels[i]}"}
                                    for i in range(100, 124)])
    (root / "forget.txt").write_text("tshirt-000\n")  # one id: its copies are found as near-duplicates and added
    torch.manual_seed(0)
    model = tiny_captioned_sd(np.stack(images), captions, PRETRAIN_STEPS)
    sd.save_sd_model(model, root / "model")


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


def test_models_on_s3_reach_the_workers_as_uris(sd_inputs, s3_env, tmp_path, monkeypatch):
    """Model and job storage on a real S3 server (SeaweedFS): the unlearn workers get the model's
    s3:// URI and the evaluation tasks fetch the unlearned model from the job's prefix themselves,
    as on a cluster whose nodes do not share the driver's disk."""
    from pipelines.job import run_job
    from retrack.storage.cache import COMPLETE_MARKER, cache_path

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    client = s3_env.client()
    spec = make_spec(sd_inputs, tmp_path, request_id="req-sd-s3", model={"uri": s3_env.upload_dir(sd_inputs / "model", "models/tiny-sd")},
                     train={"steps": 2}, evaluation={"stable_diffusion": {"generations_per_caption": 2, "inference_steps": 4, "guidance_scale": 1.0}},
                     storage={"root": s3_env.uri("sd-jobs"), "endpoint_url": s3_env.endpoint})
    result = run_job(spec)
    assert result.stages_run == ["index", "neighbours", "unlearn", "evaluate", "register"]
    assert result.verdict in ("forgotten", "not forgotten") and math.isfinite(result.metrics["unlearned"]["integrity"])
    unlearned_uri = s3_env.uri(f"sd-jobs/req-sd-s3/{spec.config_hash()}/model")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"sd-jobs/req-sd-s3/{spec.config_hash()}/")["Contents"]]
    assert any(k.endswith("model/unet/diffusion_pytorch_model.safetensors") for k in keys)
    assert any(k.endswith("report/report.json") for k in keys)
    # Only an evaluation task downloads the unlearned model from its URI (the driver has its own copy).
    cached = cache_path(unlearned_uri)
    assert (cached / COMPLETE_MARKER).is_file() and sd.load_sd_model(cached).resolution == 16
