"""`retrack run` on a KubeRay-shaped cluster (tests/fixtures/cluster.py): a head with 0 CPUs that
runs the driver, worker nodes that cannot read the driver's disk, every input and output on S3,
an MLflow server with S3 artifacts. Issue 20: no driver-local path may reach a task, and a job
survives the loss of a whole worker node."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import retrack
from retrack.config.spec import JobSpec
from tests.fixtures.specs import s3_job_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALL_STAGES = ["index", "neighbours", "unlearn", "evaluate", "register"]
REPORT_FILES = {"metrics.png", "report.json", "report.md", "samples_before_after.png"}


def write_job(cluster, inputs, request_id: str, **over) -> tuple[Path, JobSpec]:
    """The `small` job on S3 as a YAML file on the driver's disk (where a RayJob's entrypoint finds
    its spec), registering its own model name."""
    data = s3_job_spec(inputs, cluster.s3, cluster.mlflow.tracking_uri, request_id,
                       mlflow={"registered_model": f"small-ddpm-{request_id}"}, **over)
    path = cluster.driver_dir / f"{request_id}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, JobSpec.model_validate(data)


def s3_keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_json(s3, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def job_prefix(spec: JobSpec) -> str:
    return f"jobs/{spec.request_id}/{spec.config_hash()}/"


def markers(s3, spec: JobSpec) -> dict[str, dict]:
    prefix = job_prefix(spec) + "stages/"
    return {Path(k).stem: s3_json(s3, k) for k in s3_keys(s3, prefix) if k.endswith(".json")}


def complete_checkpoints(s3, spec: JobSpec) -> list[int]:
    """Steps of the run's checkpoints on S3 whose every file is uploaded (a kill timed on a
    checkpoint folder merely existing can land mid-upload)."""
    from retrack.training.checkpoint import STATE_FILE, checkpoint_step

    prefix = f"jobs/checkpoints/{spec.run_name}/"
    keys = set(s3_keys(s3, prefix))
    steps = []
    for key in keys:
        folder, _, name = key[len(prefix):].rpartition("/")
        if name == STATE_FILE and checkpoint_step(folder) is not None:
            state = s3_json(s3, key)
            if all(f"{prefix}{folder}/{f}" in keys for f in state["files"]):
                steps.append(checkpoint_step(folder))
    return sorted(steps)


def failure(cluster, run) -> str:
    return f"exit {run.returncode} after {run.seconds:.0f} s\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-6000:]}\n{cluster.logs()}"


def test_a_worker_node_cannot_read_the_drivers_files(ray_cluster):
    """A control task on each worker node reads a file outside the hidden folders and the shared
    image (the repository), and fails to read the files the driver has just written in its
    working dir, temp dir and ~/.cache."""
    shared = ray_cluster.root / "outside-the-hidden-folders.txt"
    shared.write_text("visible")
    image = Path(retrack.__file__)
    start = time.monotonic()
    report = ray_cluster.probe(extra=[shared, image])
    print(f"\nisolation probe: {time.monotonic() - start:.1f} s (cluster start-up {ray_cluster.startup_seconds:.1f} s)")
    assert sorted(report) == sorted(n.resource for n in ray_cluster.live_nodes()) and report
    for seen in report.values():
        assert seen["read"].pop(str(shared)) == "visible"
        assert seen["read"].pop(str(image)) == image.read_text()
        hidden = seen["read"]
        assert len(hidden) == len(ray_cluster.hidden_dirs()) and all(text.startswith("FileNotFoundError") for text in hidden.values()), hidden


def test_run_with_every_input_on_s3(ray_cluster, small_on_s3):
    """`retrack run` as the cluster's driver: model, corpus, forget file and holdout on S3; the
    stage markers, the report and the registered version (with its verdict) land on S3 and in
    MLflow."""
    from mlflow import MlflowClient

    path, spec = write_job(ray_cluster, small_on_s3, "req-cluster")
    run = ray_cluster.run_retrack(["run", path.name], timeout=400)
    print(f"\nretrack run on the cluster: {run.seconds:.1f} s")
    assert run.returncode == 0, failure(ray_cluster, run)
    records = markers(ray_cluster.s3, spec)
    assert sorted(records) == sorted(ALL_STAGES)
    assert all(r["config_hash"] == spec.config_hash() for r in records.values())
    report = {Path(k).name for k in s3_keys(ray_cluster.s3, job_prefix(spec) + "report/")}
    assert report == REPORT_FILES
    verdict = records["evaluate"]["verdict"]
    assert f"verdict: {verdict}" in run.stderr
    name = spec.mlflow.registered_model
    client = MlflowClient(tracking_uri=ray_cluster.mlflow.tracking_uri)
    mv = client.get_model_version(name, records["register"]["model_version"])
    assert mv.tags["retrack.request_id"] == spec.request_id and mv.tags["retrack.verdict"] == verdict
    assert mv.tags["retrack.model_digest"] == records["unlearn"]["model_digest"]
    artifacts = s3_keys(ray_cluster.s3, "mlflow-artifacts/")
    assert any(k.endswith("model/unet/diffusion_pytorch_model.safetensors") for k in artifacts)
    assert any(mv.run_id in k and k.endswith("report/report.json") for k in artifacts)


def test_worker_node_lost_mid_unlearning(ray_cluster, small_on_s3):
    """SIGKILL the worker node (raylet and workers) once a checkpoint is on S3, then start another
    node: the job finishes with the planned updates, resumed from a checkpoint, not from step 0.
    Then the driver's disk is wiped (a new driver pod) and a rerun finds every stage done on S3."""
    from mlflow import MlflowClient

    steps, every = 30, 5
    train = {"steps": steps, "batch_size": 4, "checkpoint_every": every}
    # Resumption is what is tested: the quality gate (30 updates of batch 4 move this tiny model
    # past its integrity ceiling) is off, so the job's outcome is its verdict alone.
    evaluation = {"gate": {"max_frechet_ratio": None, "max_integrity_ratio": None}}
    path, spec = write_job(ray_cluster, small_on_s3, "req-nodeloss", train=train, evaluation=evaluation)
    start = time.monotonic()
    proc = ray_cluster.start_retrack(["run", path.name])
    while not complete_checkpoints(ray_cluster.s3, spec):
        if proc.poll() is not None:
            pytest.fail("retrack run ended before its first checkpoint: " + failure(ray_cluster, ray_cluster.finish_retrack(proc, start, 10)))
        assert time.monotonic() - start < 300, "no checkpoint on S3 within 300 s"
        time.sleep(0.1)
    (victim,) = ray_cluster.live_nodes()
    ray_cluster.kill_node(ray_cluster.nodes.index(victim))
    before = complete_checkpoints(ray_cluster.s3, spec)[-1]
    assert "unlearn" not in markers(ray_cluster.s3, spec), "unlearning finished before the node was killed"
    ray_cluster.add_node()
    run = ray_cluster.finish_retrack(proc, start, timeout=400)
    assert run.returncode == 0, failure(ray_cluster, run)
    records = markers(ray_cluster.s3, spec)
    print(f"\nnode lost at step {before} of {steps}, resumed from {records['unlearn']['resumed_from']}: the run took {run.seconds:.1f} s")
    assert sorted(records) == sorted(ALL_STAGES)
    unlearn = records["unlearn"]
    assert unlearn["steps"] == steps
    # Restarted from the newest checkpoint on S3 when the node died, not from step 0.
    assert unlearn["resumed_from"][:1] == [before], unlearn

    ray_cluster.wipe_driver()
    path, _ = write_job(ray_cluster, small_on_s3, "req-nodeloss", train=train, evaluation=evaluation)
    again = ray_cluster.run_retrack(["run", path.name], timeout=300)
    assert again.returncode == 0, failure(ray_cluster, again)
    assert markers(ray_cluster.s3, spec) == records  # every stage skipped: no marker rewritten
    assert not [line for line in again.stderr.splitlines() if line.startswith("─") and any(s in line for s in ALL_STAGES)], again.stderr
    assert f"model version: {records['register']['model_version']}" in again.stderr
    versions = MlflowClient(tracking_uri=ray_cluster.mlflow.tracking_uri).search_model_versions(f"name = '{spec.mlflow.registered_model}'")
    assert len(versions) == 1


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_run_on_an_image_folder_and_webdataset_shards_on_s3(ray_cluster, small_on_s3, fmt):
    """The same job with its corpus and holdout as an image folder (metadata.jsonl labels) or as
    WebDataset tar shards (cls labels) on S3: the workers stream the files themselves. The tar
    corpus is 34 shards of 8: preflight reads their keys in Ray tasks, on the worker nodes, and
    Ray Data writes the id table from them there."""
    from retrack.data.source import SCAN_GROUPS_FROM
    from tests.fixtures.corpora import WRITERS

    bench, run_dir = small_on_s3["root"] / "bench", ray_cluster.root / fmt
    shards = {"shard_size": 8} if fmt == "webdataset" else {}
    uris = {part: ray_cluster.s3.upload_dir(WRITERS[fmt](bench / part, run_dir / part, captions=False, **(shards if part == "corpus" else {})),
                                            f"datasets/small-{fmt}/{part}")
            for part in ("corpus", "holdout")}
    if fmt == "webdataset":
        assert len(list((run_dir / "corpus").glob("*.tar"))) >= SCAN_GROUPS_FROM
    path, spec = write_job(ray_cluster, small_on_s3, f"req-{fmt}", corpus={"uri": uris["corpus"], "format": fmt},
                           evaluation={"holdout_uri": uris["holdout"]})
    run = ray_cluster.run_retrack(["run", path.name], timeout=400)
    print(f"\nretrack run on the cluster, {fmt} corpus: {run.seconds:.1f} s")
    assert run.returncode == 0, failure(ray_cluster, run)
    records = markers(ray_cluster.s3, spec)
    assert sorted(records) == sorted(ALL_STAGES) and records["evaluate"]["verdict"] == "forgotten"
    assert {Path(k).name for k in s3_keys(ray_cluster.s3, job_prefix(spec) + "report/")} == REPORT_FILES
    assert records["register"]["model_version"]


def test_stable_diffusion_with_captions_in_an_image_folder_on_s3(ray_cluster, sd_inputs):
    """A tiny Stable Diffusion that memorises a planted captioned item; its corpus and holdout as
    image folders whose metadata.jsonl carries the captions, the model and the forget file on S3.
    The index holds latents pooled 2x2 (a compact index), its candidates re-ranked on the full
    latents stored beside it on S3, which training and evaluation read too. The planted item's copies are found in latent space and
    forgotten; the version is registered."""
    from mlflow import MlflowClient

    from tests.fixtures.corpora import write_imagefolder
    from tests.fixtures.sd import COPIES

    s3, work = ray_cluster.s3, ray_cluster.root / "sd"
    uris = {part: s3.upload_dir(write_imagefolder(sd_inputs / part, work / part), f"datasets/sd-{part}") for part in ("corpus", "holdout")}
    s3.client().put_object(Bucket=s3.bucket, Key="requests/req-sd/forget.txt", Body=(sd_inputs / "forget.txt").read_bytes())
    inputs = {"model": s3.upload_dir(sd_inputs / "model", "models/tiny-sd"), "corpus": uris["corpus"], "holdout": uris["holdout"],
              "forget": s3.uri("requests/req-sd/forget.txt")}
    path, spec = write_job(
        ray_cluster, inputs, "req-cluster-sd", model={"kind": "stable-diffusion"}, corpus={"format": "imagefolder"}, index={"latent_pool": 2},
        train={"steps": 20, "batch_size": 8, "lr": 2e-4, "checkpoint_every": 0}, scaling={"num_workers": 1, "cpus_per_worker": 0.5},
        evaluation={"num_samples": 16, "stable_diffusion": {"generations_per_caption": 16, "inference_steps": 20, "guidance_scale": 1.0}},
    )
    run = ray_cluster.run_retrack(["run", path.name], timeout=600)
    print(f"\nretrack run on the cluster, tiny Stable Diffusion from an image folder: {run.seconds:.1f} s")
    assert run.returncode == 0, failure(ray_cluster, run)
    records = markers(s3, spec)
    assert sorted(records) == sorted(ALL_STAGES) and records["evaluate"]["verdict"] == "forgotten"
    assert records["neighbours"]["forget_count"] == COPIES
    # The items' latents came from the index's full latents on S3 (read by the encoding actors): no VAE ran for them.
    items = records["unlearn"]["items"]
    assert items["from_index"] > COPIES and items["encoded"] == 0
    manifest = s3_json(s3, records["index"]["index_uri"].split(f"{s3.bucket}/", 1)[1] + "/manifest.json")
    assert manifest["encoder"]["spec"]["pool"] == 2 and manifest["dim"] == 4 * 4 * 4  # of 4x8x8 latents
    assert all(s["latents"]["size"] == s["count"] * 4 * 8 * 8 * 2 for s in manifest["shards"])
    assert {Path(k).name for k in s3_keys(s3, job_prefix(spec) + "report/")} == REPORT_FILES
    assert any(k.endswith("model/unet/diffusion_pytorch_model.safetensors") for k in s3_keys(s3, job_prefix(spec) + "model/"))
    mv = MlflowClient(tracking_uri=ray_cluster.mlflow.tracking_uri).get_model_version(spec.mlflow.registered_model, records["register"]["model_version"])
    assert mv.tags["retrack.verdict"] == "forgotten" and mv.tags["retrack.forget_count"] == str(COPIES)


DRIVER_CAP = 1_152 * 2**20  # the driver pod's limits.memory in this test (its peak is about 830 MiB)


def big_pictures(corpus: Path, side: int):
    """The rows of a parquet corpus with each image scaled up to side x side (nearest
    neighbour, stored uncompressed), so the corpus's bytes outgrow the driver's memory."""
    from retrack.data.corpus import decode_image
    from tests.fixtures.corpora import corpus_rows

    for row in corpus_rows(corpus, captions=False):
        img = decode_image(row["image"])[:, :, 0]
        scale = side // img.shape[0]
        buf = io.BytesIO()
        Image.fromarray(np.kron(img, np.ones((scale, scale), np.uint8))).save(buf, format="PNG", compress_level=0)
        yield {**row, "image": buf.getvalue()}


def test_a_corpus_larger_than_the_drivers_memory_limit(ray_cluster, small_on_s3):
    """The small job on its corpus of 2304x2304 pictures (an image folder larger than the
    driver's memory limit; each brought to the model's 8x8 as a worker reads it) with the driver
    under that limit (a memory cgroup, as a pod's limits.memory): it finishes, forgets the planted
    item and registers, and the index records the resize."""
    from tests.fixtures.corpora import write_imagefolder
    from tests.fixtures.memory_cap import MemoryCap

    folder = write_imagefolder(big_pictures(small_on_s3["root"] / "bench" / "corpus", 2304), ray_cluster.root / "big", captions=False)
    corpus_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    uri = ray_cluster.s3.upload_dir(folder, "datasets/small-big-pictures")
    shutil.rmtree(folder)
    assert corpus_bytes > DRIVER_CAP
    holdout = ray_cluster.s3.upload_dir(write_imagefolder(small_on_s3["root"] / "bench" / "holdout", ray_cluster.root / "big-holdout", captions=False),
                                        "datasets/small-big-pictures-holdout")
    path, spec = write_job(ray_cluster, small_on_s3, "req-big-pictures", corpus={"uri": uri, "format": "imagefolder"},
                           evaluation={"holdout_uri": holdout})
    cap = MemoryCap(DRIVER_CAP)
    try:
        run = ray_cluster.run_retrack(["run", path.name], timeout=600, cap=cap)
        oom_kills = cap.oom_kills
    finally:
        cap.close()
    print(f"\nretrack run, a {corpus_bytes / 2**20:.0f} MiB corpus, the driver limited to {DRIVER_CAP / 2**20:.0f} MiB by a "
          f"{cap.how}: {run.seconds:.1f} s, driver peak RSS {cap.peak / 2**20:.0f} MiB")
    assert run.returncode == 0 and oom_kills == 0, failure(ray_cluster, run)
    assert 0 < cap.peak < DRIVER_CAP
    records = markers(ray_cluster.s3, spec)
    assert sorted(records) == sorted(ALL_STAGES) and records["evaluate"]["verdict"] == "forgotten"
    manifest = s3_json(ray_cluster.s3, records["index"]["index_uri"].split(f"{ray_cluster.s3.bucket}/", 1)[1] + "/manifest.json")
    assert manifest["corpus"]["image_shape"] == [8, 8, 1] and manifest["corpus"]["fit"].startswith("shorter side resized")


def test_tune_a_two_trial_grid(ray_cluster, small_on_s3):
    """`retrack tune` as the cluster's driver: two trials (λ 0.3 and 0.5) train on the worker node
    and keep their models under the job's prefix on S3; the chosen one is evaluated and registered."""
    from mlflow import MlflowClient

    tune = {"search": "grid", "trials": 2, "num_samples": 32, "space": {"lambda": {"values": [0.3, 0.5]}}, "select": {"max_frequency_ratio": 1.0}}
    path, spec = write_job(ray_cluster, small_on_s3, "req-cluster-tune", tune=tune)
    run = ray_cluster.run_retrack(["tune", path.name], timeout=600)
    print(f"\nretrack tune (2-trial grid) on the cluster: {run.seconds:.1f} s")
    assert run.returncode == 0, failure(ray_cluster, run)
    tuned = s3_keys(ray_cluster.s3, job_prefix(spec) + "tune/")
    assert sum(k.endswith("/unet/diffusion_pytorch_model.safetensors") for k in tuned) == 2, tuned
    front = s3_json(ray_cluster.s3, job_prefix(spec) + "tune/pareto.json")
    assert front["chosen"]["params"]["lambda"] in (0.3, 0.5)
    client = MlflowClient(tracking_uri=ray_cluster.mlflow.tracking_uri)
    (mv,) = client.search_model_versions(f"name = '{spec.mlflow.registered_model}'")
    assert mv.tags["retrack.verdict"] and mv.tags["retrack.request_id"] == spec.request_id
    registered = client.get_run(mv.run_id)
    assert any(k.endswith("report/report.json") for k in s3_keys(ray_cluster.s3, "mlflow-artifacts/") if mv.run_id in k)
    assert registered.data.tags["mlflow.parentRunId"]


def without_first_image(shard: Path) -> str:
    """Rewrite a WebDataset shard without its first sample's image member; that sample's key."""
    import tarfile

    from tests.fixtures.corpora import add_member

    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = next(name for name, _ in members if name.endswith(".png"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name != dropped:
                add_member(tar, name, data)
    return dropped.rsplit(".", 1)[0]


def bad_webdataset(cluster, inputs, request) -> tuple[dict, dict, str]:
    from tests.fixtures.corpora import write_webdataset

    shards = write_webdataset(inputs["root"] / "bench" / "corpus", cluster.root / "bad-wds", captions=False, shard_size=64)
    key = without_first_image(shards / "shard-00000.tar")
    uri = cluster.s3.upload_dir(shards, "datasets/small-imageless")
    return inputs, {"corpus": {"uri": uri, "format": "webdataset"}}, f"shard shard-00000.tar: sample '{key}' has no image"


def uncaptioned_sd(cluster, inputs, request) -> tuple[dict, dict, str]:
    from tests.fixtures.corpora import write_imagefolder

    sd_inputs = request.getfixturevalue("sd_inputs")
    s3 = cluster.s3
    s3.client().put_object(Bucket=s3.bucket, Key="requests/req-sd/forget.txt", Body=(sd_inputs / "forget.txt").read_bytes())
    folder = write_imagefolder(sd_inputs / "corpus", cluster.root / "sd-uncaptioned", captions=False)
    sd = {"model": s3.upload_dir(sd_inputs / "model", "models/tiny-sd"), "corpus": s3.upload_dir(folder, "datasets/sd-uncaptioned"),
          "holdout": s3.upload_dir(write_imagefolder(sd_inputs / "holdout", cluster.root / "sd-holdout"), "datasets/sd-holdout-captioned"),
          "forget": s3.uri("requests/req-sd/forget.txt")}
    return sd, {"model": {"kind": "stable-diffusion"}, "corpus": {"format": "imagefolder"}}, "70 of 70 item(s) have no caption"


def missing_bucket(cluster, inputs, request) -> tuple[dict, dict, str]:
    return inputs, {"corpus": {"uri": "s3://no-such-bucket/datasets/small"}}, f"bucket 'no-such-bucket' does not exist at {cluster.s3.endpoint}"


def local_paths(cluster, inputs, request) -> tuple[dict, dict, str]:
    """A spec written for one machine: its outputs and model on the driver's disk."""
    model = str(inputs["root"] / "original")
    over = {"storage": {"root": str(cluster.driver_dir / LOCAL_ROOT)}, "model": {"uri": model}}
    return inputs, over, f"share no filesystem with the driver, but the spec names local paths (storage.root = {cluster.driver_dir / LOCAL_ROOT}; model.uri = {model})"


LOCAL_ROOT = "local-jobs"


@pytest.mark.parametrize("case", [missing_bucket, bad_webdataset, uncaptioned_sd, local_paths], ids=lambda f: f.__name__)
def test_bad_input_is_refused_before_any_stage(ray_cluster, small_on_s3, request, case):
    """Refused by the driver's preflight (exit 2) with a specific message; no stage ran and the
    job's prefix on S3 stays empty."""
    inputs, over, message = case(ray_cluster, small_on_s3, request)
    path, spec = write_job(ray_cluster, inputs, f"req-bad-{case.__name__.replace('_', '-')}", **over)
    run = ray_cluster.run_retrack(["run", path.name], timeout=300)
    print(f"\n{case.__name__}: refused in {run.seconds:.1f} s")
    assert run.returncode == 2, failure(ray_cluster, run)
    assert message in run.stderr, run.stderr
    assert not any(line.startswith("─") for line in run.stderr.splitlines()), run.stderr  # no stage started
    assert s3_keys(ray_cluster.s3, job_prefix(spec)) == []
    assert not (ray_cluster.driver_dir / LOCAL_ROOT).exists()


def test_a_shard_deleted_mid_run_fails_naming_it(ray_cluster, small_on_s3):
    """The shard that holds the item to forget is deleted from S3 once the index is built: the
    unlearn stage cannot read it and the job stops with a one-line error naming the file (exit 2);
    nothing is registered."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    corpus = small_on_s3["root"] / "bench" / "corpus"
    forget = (small_on_s3["root"] / "bench" / "forget_ids.txt").read_text().split()[0]
    shard = next(p.name for p in sorted(corpus.glob("*.parquet")) if forget in pq.read_table(p, columns=["id"])["id"].to_pylist())
    uri = ray_cluster.s3.upload_dir(corpus, "datasets/small-doomed")
    path, spec = write_job(ray_cluster, small_on_s3, "req-shard-gone", corpus={"uri": uri})
    start = time.monotonic()
    proc = ray_cluster.start_retrack(["run", path.name])
    while "index" not in markers(ray_cluster.s3, spec):
        if proc.poll() is not None:
            pytest.fail("retrack run ended before its index was built: " + failure(ray_cluster, ray_cluster.finish_retrack(proc, start, 10)))
        assert time.monotonic() - start < 300, "no index within 300 s"
        time.sleep(0.1)
    ray_cluster.s3.client().delete_object(Bucket=ray_cluster.s3.bucket, Key=f"datasets/small-doomed/{shard}")
    run = ray_cluster.finish_retrack(proc, start, timeout=300)
    print(f"\nshard deleted after the index stage: the run ended after {run.seconds:.1f} s")
    assert run.returncode == 2, failure(ray_cluster, run)
    s3 = ray_cluster.s3
    assert run.stderr.strip().splitlines()[-1] == f"error: {s3.uri(f'datasets/small-doomed/{shard}')} (bucket '{s3.bucket}' at {s3.endpoint}) does not exist"
    assert "register" not in markers(ray_cluster.s3, spec)
    assert not MlflowClient(tracking_uri=ray_cluster.mlflow.tracking_uri).search_model_versions(f"name = '{spec.mlflow.registered_model}'")
