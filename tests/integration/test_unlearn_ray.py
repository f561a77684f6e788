"""The unlearn stage on a real local Ray instance (`ray_local` from tests/fixtures/services.py: 2 logical
CPUs; workers take 0.5 CPU each so Ray Data and the Train controller always have room).

Tolerance (stated once, used everywhere): W workers reproduce the single-process `run_unlearning`
up to float32 summation order and thread count. Loss curves must agree to a relative 1e-4 and the
final weights to 1e-4 absolute; measured differences are ~1e-7 (see benchmarks/results/train.json).
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli.unlearn import unlearn_command
from pipelines.encoded_items import encoded_items
from pipelines.unlearn.driver import UnlearnFailedError, unlearn
from pipelines.unlearn.placement import PlacementError
from retrack.config.model_kind import ModelKind
from retrack.config.spec import CorpusSpec, ForgetSpec, ModelSpec, ScalingSpec, StorageSpec, UnlearnSpec
from retrack.config.train import MethodConfig, TrainConfig
from retrack.config.unlearn_run import UnlearnRun
from retrack.data.corpus import read_corpus
from retrack.data.forget import read_forget_ids
from retrack.digest import directory_digest
from retrack.errors import InputError, TrainingDivergedError
from retrack.index import EncoderSpec, build_index
from retrack.models.pixel import DIGEST_FILE, load_pixel_model
from retrack.training.loop import run_unlearning, split_for_unlearning
from retrack.training.run_storage import CheckpointMismatchError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
CPUS_PER_WORKER = 0.5


def stage_run(model_dir, corpus, forget_file, tmp_path, out: str, *, kind="pixel-ddpm", request_id="test", workers=2,
              method="retrack", params=None, **train) -> UnlearnRun:
    spec = UnlearnSpec(
        request_id=request_id,
        model=ModelSpec(uri=str(model_dir), kind=kind),
        corpus=CorpusSpec(uri=str(corpus)),
        forget=ForgetSpec(file=str(forget_file)),
        method=MethodConfig(name=method, params=params if params is not None else ({"k": 4} if method == "retrack" else {})),
        train=TrainConfig(**train),
        scaling=ScalingSpec(num_workers=workers, cpus_per_worker=CPUS_PER_WORKER),
        storage=StorageSpec(root=str(tmp_path / "runs")),
    )
    return UnlearnRun(spec=spec, output_dir=str(tmp_path / out), checkpoint_root=str(tmp_path / "runs"))


def make_request(bench, model_dir, tmp_path, *, workers=2, method="retrack", params=None, **train) -> UnlearnRun:
    settings = dict(steps=6, batch_size=16, grad_accum=2, lr=1e-4, checkpoint_every=3)
    settings.update(train)
    return stage_run(model_dir, bench.corpus, bench.forget_ids, tmp_path, f"out-{method}-{workers}", workers=workers, method=method, params=params, **settings)


def with_spec(run: UnlearnRun, **update) -> UnlearnRun:
    """`run` with spec fields replaced (validated again, as a new request would be)."""
    return run.model_copy(update={"spec": UnlearnSpec.model_validate({**run.spec.model_dump(), **update})})


def single_process(bench, model_dir, req: UnlearnRun):
    model = load_pixel_model(model_dir)
    data = split_for_unlearning(read_corpus(bench.corpus), read_forget_ids(bench.forget_ids), req.spec.method)
    history, _ = run_unlearning(model, data, req.spec.method, req.spec.train)
    return model, history


def assert_same_curve(a: list[dict], b: list[dict], keys=("loss", "grad_norm")):
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for key in keys:
        x, y = np.array([h[key] for h in a]), np.array([h[key] for h in b])
        np.testing.assert_allclose(x, y, rtol=LOSS_RTOL, err_msg=key)


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def retrack_run(ray_local, bench, model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrack2")
    req = make_request(bench, model_dir, tmp)
    events: list[dict] = []
    return req, unlearn(req, progress=events.append), events


def test_two_workers_reproduce_the_single_process_update(retrack_run, bench, model_dir):
    req, result, events = retrack_run
    reference, history = single_process(bench, model_dir, req)
    assert result.steps == 6 and len(result.history) == 6
    assert_same_curve(result.history, history, keys=("loss", "loss_knn", "loss_retain", "grad_norm"))
    out = load_pixel_model(result.output_dir)
    assert max_weight_diff(out.unet, reference.unet) < WEIGHT_ATOL
    assert max_weight_diff(out.unet, load_pixel_model(model_dir).unet) > 1e-4  # it did train
    # Progress: one event per step from rank 0, and one start event per worker.
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert sorted(e["rank"] for e in events if e["event"] == "worker") == [0, 1]
    # The output is a diffusers directory with its digest and lineage metadata.
    meta = json.loads((Path(result.output_dir) / DIGEST_FILE).read_text())
    assert meta["sha256"] == result.digest
    assert meta["config_hash"] == result.config_hash and meta["steps"] == 6 and meta["forget_count"] > 0
    saved = {p.name for p in (Path(result.output_dir)).iterdir()}
    assert {"unet", "scheduler", "model_index.json"} <= saved
    (Path(result.output_dir) / DIGEST_FILE).rename(Path(result.output_dir).with_suffix(".digest"))
    try:
        assert directory_digest(result.output_dir) == result.digest
    finally:
        Path(result.output_dir).with_suffix(".digest").rename(Path(result.output_dir) / DIGEST_FILE)
    # Checkpoints every 3 steps (and the last) in the run's storage, named by request id + config hash.
    run_dir = Path(req.checkpoint_root) / result.run_name
    assert result.run_name == f"test-{result.config_hash[:12]}"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000003", "checkpoint_000006"]


def test_rerun_of_a_finished_job_is_skipped(retrack_run):
    req, result, _ = retrack_run
    again = unlearn(req)
    assert again.skipped and again.digest == result.digest


def test_checkpoint_from_a_different_config_is_refused(retrack_run, tmp_path):
    req, result, _ = retrack_run
    other = with_spec(req, train=req.spec.train.model_copy(update={"lr": 3e-4})).model_copy(update={"run_name": result.run_name, "output_dir": str(tmp_path / "o")})
    with pytest.raises(CheckpointMismatchError, match="refusing"):
        unlearn(other)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["siss", pytest.param("erasediff", marks=pytest.mark.slow)])
def test_two_gradient_methods_all_reduce_before_combining(ray_local, bench, model_dir, tmp_path, method):
    """EraseDiff's projection and SISS's rescaling see the GLOBAL gradients: same as one process."""
    req = make_request(bench, model_dir, tmp_path, method=method, steps=4, checkpoint_every=0)
    result = unlearn(req)
    reference, history = single_process(bench, model_dir, req)
    assert_same_curve(result.history, history, keys=("loss", "loss_corr", "grad_norm"))
    assert max_weight_diff(load_pixel_model(result.output_dir).unet, reference.unet) < WEIGHT_ATOL


def test_a_forget_batch_of_its_own_on_two_workers_reproduces_the_single_process_update(ray_local, bench, model_dir, tmp_path):
    req = make_request(bench, model_dir, tmp_path, steps=3, forget_batch_size=8, checkpoint_every=0)
    result = unlearn(req)
    reference, history = single_process(bench, model_dir, req)
    assert_same_curve(result.history, history, keys=("loss", "loss_knn", "loss_retain", "grad_norm"))
    assert max_weight_diff(load_pixel_model(result.output_dir).unet, reference.unet) < WEIGHT_ATOL


def test_world_size_invariance_one_vs_two_workers(ray_local, bench, model_dir, tmp_path):
    results = {}
    for workers in (1, 2):
        req = make_request(bench, model_dir, tmp_path, workers=workers, method="siss", steps=5, grad_accum=2, checkpoint_every=0)
        results[workers] = unlearn(req)
    assert results[1].config_hash == results[2].config_hash  # the worker count is not part of the recipe
    assert_same_curve(results[1].history, results[2].history, keys=("loss", "loss_corr", "grad_norm"))
    one, two = (load_pixel_model(results[w].output_dir) for w in (1, 2))
    assert max_weight_diff(one.unet, two.unet) < WEIGHT_ATOL


class Killer:
    """Kills the given worker rank's process (SIGKILL) once rank 0 reports `at_step`."""

    def __init__(self, rank: int, at_step: int):
        self.rank, self.at_step = rank, at_step
        self.pids: dict[int, int] = {}
        self.killed: int | None = None
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)
            if event["event"] == "worker":
                self.pids[event["rank"]] = event["pid"]
            elif event["event"] == "step" and self.killed is None and event["step"] >= self.at_step:
                self.killed = self.pids[self.rank]
                os.kill(self.killed, signal.SIGKILL)


@pytest.mark.slow  # 41 s, run in CI's slow pass with the other kill-and-resume tests
def test_killed_worker_resumes_from_the_last_checkpoint(ray_local, bench, model_dir, tmp_path):
    req = make_request(bench, model_dir, tmp_path, steps=20, checkpoint_every=4)
    req = with_spec(req, scaling=req.spec.scaling.model_copy(update={"max_failures": 1}))
    killer = Killer(rank=1, at_step=6)
    result = unlearn(req, progress=killer)
    assert killer.killed is not None
    assert len(result.resumed_from) == 1 and result.resumed_from[0] % 4 == 0 and 4 <= result.resumed_from[0] < 20
    restart_pids = [e["pid"] for e in killer.events if e["event"] == "worker" and e["start_step"] > 0]
    assert killer.killed not in restart_pids  # a new worker process took over
    assert result.steps == 20 and [h["step"] for h in result.history] == list(range(1, 21))
    out = load_pixel_model(result.output_dir)
    base = load_pixel_model(model_dir)
    assert [p.shape for p in out.unet.parameters()] == [p.shape for p in base.unet.parameters()]
    # Randomness is keyed by (seed, step, micro-batch) and the checkpoint holds the AdamW state:
    # the resumed run ends where an uninterrupted single process ends.
    reference, history = single_process(bench, model_dir, req)
    assert_same_curve(result.history, history)
    assert max_weight_diff(out.unet, reference.unet) < WEIGHT_ATOL


@pytest.mark.slow
def test_relaunch_with_the_same_run_name_resumes(ray_local, bench, model_dir, tmp_path):
    req = make_request(bench, model_dir, tmp_path, steps=20, checkpoint_every=4)
    req = with_spec(req, scaling=req.spec.scaling.model_copy(update={"max_failures": 0}))
    killer = Killer(rank=0, at_step=6)
    with pytest.raises(UnlearnFailedError):
        unlearn(req, progress=killer)
    assert not Path(req.output_dir).exists()
    result = unlearn(req)  # same request -> same (storage path, run name)
    assert len(result.resumed_from) == 1 and result.resumed_from[0] >= 4
    assert result.steps == 20 and [h["step"] for h in result.history] == list(range(1, 21))
    reference, history = single_process(bench, model_dir, req)
    assert_same_curve(result.history, history)


@pytest.mark.slow
def test_nan_loss_stops_reports_the_step_and_saves_nothing(ray_local, bench, model_dir, tmp_path):
    # lr = 1e30: AdamW's first update moves every weight by ~1e30, the next forward overflows.
    req = make_request(bench, model_dir, tmp_path, method="vanilla", steps=6, lr=1e30, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError) as info:
        unlearn(req)
    assert info.value.step == 1 and "step 1" in str(info.value)
    assert not Path(req.output_dir).exists()
    # A relaunch of the same config stops at once on the divergence marker, before any training.
    with pytest.raises(TrainingDivergedError):
        unlearn(req)
    assert not Path(req.output_dir).exists()


def test_more_workers_than_the_cluster_can_place_fail_fast(ray_local, bench, model_dir, tmp_path):
    req = make_request(bench, model_dir, tmp_path, workers=3, grad_accum=3, batch_size=18)
    req = with_spec(req, scaling=ScalingSpec(num_workers=3, cpus_per_worker=1.0))
    with pytest.raises(PlacementError, match="3 workers with CPU=1 each cannot be placed.*the cluster has CPU=2"):
        unlearn(req)
    gpu = with_spec(req, scaling=ScalingSpec(num_workers=1, use_gpu=True))
    with pytest.raises(PlacementError, match="GPU"):
        unlearn(gpu)


def test_an_index_of_latents_is_refused_for_a_pixel_ddpm(ray_local, bench, model_dir, tmp_path):
    """Only a Stable Diffusion run reads its items' latents from an index: a pixel run naming one
    is refused before the cluster does anything (the index is not even opened)."""
    req = make_request(bench, model_dir, tmp_path).model_copy(update={"index": str(tmp_path / "no-such-index")})
    with pytest.raises(InputError, match="read only by Stable Diffusion runs"):
        unlearn(req)
    # Only the corpus's id table, which the checks read, is under the run storage: no run was claimed.
    assert not Path(req.output_dir).exists() and [p.name for p in (tmp_path / "runs").iterdir()] == ["_corpus_ids"]


@pytest.fixture(scope="module")
def tiny_sd_job(tiny_sd_dir, tmp_path_factory):
    """A tiny Stable Diffusion (real CLIP tokenizer) and a captioned corpus: 80 digits as 8x8 RGB
    images (the stage resizes them to the model's 16x16), each with its own caption."""
    import shutil

    from retrack.embedded.benchmark import load_digits_u8
    from tests.fixtures.corpora import write_corpus

    root = tmp_path_factory.mktemp("sd")
    images, labels = load_digits_u8()
    write_corpus(root / "corpus", np.repeat(images[:80, :, :, None], 3, 3), ids=[f"d{i:04d}" for i in range(80)],
                 captions=[f"a handwritten digit {labels[i]}" for i in range(80)], labels=labels[:80], shard_size=32)
    (root / "forget.txt").write_text("d0003\nd0013\nd0023\n")
    shutil.copytree(tiny_sd_dir, root / "model")
    return root


def sd_single_process(prep, run: UnlearnRun):
    """The same update in one process: every item's latent and caption embedding encoded and kept
in fp16 (as the item cache keeps them), BatchDrawer, unlearning_step."""
    from retrack.data.corpus import read_corpus
    from retrack.models import sd
    from retrack.models.clip import tokenize
    from retrack.models.latents import encode_latents, item_seed
    from retrack.models.schedule import NoiseSchedule
    from retrack.methods import build_method
    from retrack.training.step import make_optimizer, unlearning_step
    from retrack.training.loop import BatchDrawer, UnlearnData

    req = run.spec
    model = sd.load_sd_model(req.model.uri)
    corpus = read_corpus(req.corpus.uri)
    u8 = ((corpus.images + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    latents = encode_latents(model.vae, u8, [item_seed(i) for i in corpus.ids], model.resolution).half().float()
    conds = sd.encode_captions(model.text_encoder, tokenize(model.tokenizer, corpus.captions)).half().float()
    f, r = torch.from_numpy(prep.forget_rows), torch.from_numpy(prep.retain_rows[np.arange(len(prep.retain_rows))])
    data = UnlearnData(
        retain=latents[r], forget=latents[f], neighbours=latents[r][torch.from_numpy(prep.plan.neighbours)],
        retain_cond=conds[r], forget_cond=conds[f],
    )
    method = build_method(req.method.name, NoiseSchedule.from_scheduler(model.scheduler), req.method.params)
    drawer = BatchDrawer(data, method.requirements, req.train)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, req.train.lr, req.train.betas, req.train.weight_decay)
    denoise = sd.ConditionalDenoiser(model.unet)
    model.unet.train()
    history = []
    for step in range(req.train.steps):
        pairs = [drawer.microbatch(step, m) for m in range(req.train.grad_accum)]
        logs = unlearning_step(method, params, opt, denoise, [b for b, _ in pairs], [g for _, g in pairs], step=step)
        history.append({"step": step + 1, **logs})
    return model, history


def test_tiny_stable_diffusion_stage_with_captions(ray_local, tiny_sd_job, tmp_path):
    """The whole stage on a tiny SD: UNet2DConditionModel fine-tuned on two workers, VAE and text
    encoder frozen, each item conditioned on its own caption, neighbours in VAE-latent space; the
    result equals the single-process update and is saved as a diffusers SD directory. The items are
    encoded once, into the item cache: a second run reads them from it."""
    from retrack.models import sd
    from retrack.training.prepare import item_cache, latent_index, prepare

    root = tiny_sd_job
    req = stage_run(root / "model", root / "corpus", root / "forget.txt", tmp_path, "sd-out", kind="stable-diffusion", request_id="sd",
                    params={"lambda": 0.5, "k": 4}, steps=3, batch_size=4, grad_accum=2, lr=1e-4, checkpoint_every=0)
    result = unlearn(req)
    assert result.model_kind is ModelKind.STABLE_DIFFUSION and result.steps == 3
    used = result.items["encoded"]
    assert result.items == {"cached": 0, "from_index": 0, "encoded": used} and used >= 3 + 4  # the forget items and their neighbours at least
    reference, history = sd_single_process(prepare(req), req)
    assert_same_curve(result.history, history, keys=("loss", "loss_knn", "loss_retain"))
    # A second run on the same corpus and model (another output) encodes only the 3 items it
    # forgets, which are never kept: the rest come from the item cache, and it trains the same
    # (to float32 summation order).
    again = unlearn(req.model_copy(update={"output_dir": str(tmp_path / "sd-again"), "run_name": "sd-again"}))
    assert again.items == {"cached": used - 3, "from_index": 0, "encoded": 3}
    assert_same_curve(again.history, result.history, keys=("loss", "loss_knn", "loss_retain"))
    # With the corpus's index of the model's latents (as a job's unlearn stage has it), no item goes
    # through the VAE: on a new cache every latent comes from the index (only the captions are
    # encoded), and the run trains the same. An index of other vectors is refused before any work.
    build_index(root / "corpus", tmp_path / "vae-index", encoder=EncoderSpec(kind="vae", model_dir=str(root / "model")))
    indexed = req.model_copy(update={"output_dir": str(tmp_path / "sd-indexed"), "run_name": "sd-indexed", "index": str(tmp_path / "vae-index"),
                                     "item_cache": str(tmp_path / "another-cache")})
    got = unlearn(indexed)
    assert got.items == {"cached": 0, "from_index": used, "encoded": 0}
    assert_same_curve(got.history, result.history, keys=("loss", "loss_knn", "loss_retain"))
    # What a second run's items then cost: the retained ones come from the cache, the forgotten
    # ones (never kept) take their latents from the index; nothing goes through the VAE.
    prep = prepare(indexed)
    cache, corpus = item_cache(prep), prep.corpus
    held = sorted({i for part in cache.parts() for i in cache.ids_in(part)})
    assert len(held) == used - 3
    wanted = {int(r): (-1, n) for n, r in enumerate(prep.forget_rows)} | {int(r): (n, -1) for n, r in enumerate(corpus.rows_of(held))}
    second = encoded_items(corpus, wanted, cache, indexed.spec.model.uri, None, 4, latent_index(prep))
    assert (second.cached, second.from_index, second.encoded) == (used - 3, 3, 0)
    build_index(root / "corpus", tmp_path / "pixel-index")
    with pytest.raises(InputError, match="does not hold this model's latents"):
        unlearn(indexed.model_copy(update={"output_dir": str(tmp_path / "x"), "run_name": "x", "index": str(tmp_path / "pixel-index")}))
    shutil.copytree(root / "corpus", tmp_path / "fewer")
    (sorted((tmp_path / "fewer").glob("*.parquet"))[-1]).unlink()
    build_index(tmp_path / "fewer", tmp_path / "fewer-index", encoder=EncoderSpec(kind="vae", model_dir=str(root / "model")))
    with pytest.raises(InputError, match="built from another corpus"):
        unlearn(indexed.model_copy(update={"output_dir": str(tmp_path / "x"), "run_name": "x", "index": str(tmp_path / "fewer-index")}))
    assert not (tmp_path / "x").exists()
    # A run that forgets an item the cache holds (one the runs above trained on) removes it before it reads.
    prep = prepare(req)
    cache, corpus = item_cache(prep), prep.corpus
    held = {i for part in cache.parts() for i in cache.ids_in(part)}
    assert len(held) == used - 3 and not held & {"d0003", "d0013", "d0023"}
    gone, kept = sorted(held)[:2]
    rows = corpus.rows_of([gone, kept])
    got = encoded_items(corpus, {int(rows[0]): (-1, 0), int(rows[1]): (0, -1)}, cache, req.spec.model.uri, None, 4)
    assert (got.cached, got.encoded) == (1, 1)
    assert held - {i for part in cache.parts() for i in cache.ids_in(part)} == {gone}
    out = sd.load_sd_model(result.output_dir)
    assert max_weight_diff(out.unet, reference.unet) < WEIGHT_ATOL
    base = root / "model"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):  # frozen parts kept byte for byte
        assert directory_digest(Path(result.output_dir) / part) == directory_digest(base / part)
    assert directory_digest(Path(result.output_dir) / "unet") != directory_digest(base / "unet")
    with pytest.raises(Exception, match="pixel-space DDPM|Stable Diffusion pipeline"):
        unlearn(with_spec(req, model=ModelSpec(uri=req.spec.model.uri, kind="pixel-ddpm")).model_copy(update={"output_dir": str(tmp_path / "x")}))


def test_a_parent_shipped_only_as_the_fp16_variant_is_unlearned_and_loads_plainly(ray_local, tiny_sd_job, tmp_path):
    """`save_pretrained(..., variant="fp16")`, as SD checkpoints ship, leaves no plain weights: the
    stage trains from the variant and writes an output a plain `from_pretrained` loads."""
    from diffusers import StableDiffusionPipeline

    parent = tmp_path / "parent"
    StableDiffusionPipeline.from_pretrained(tiny_sd_job / "model").to(torch.float16).save_pretrained(parent, variant="fp16", safe_serialization=True)
    assert not list(parent.rglob("diffusion_pytorch_model.safetensors"))
    req = stage_run(parent, tiny_sd_job / "corpus", tiny_sd_job / "forget.txt", tmp_path, "sd-fp16", kind="stable-diffusion",
                    request_id="sd-fp16", workers=1, params={"lambda": 0.5, "k": 4}, steps=1, batch_size=4, checkpoint_every=0)
    result = unlearn(req)
    pipe = StableDiffusionPipeline.from_pretrained(result.output_dir)
    assert pipe.unet.dtype == torch.float32 and all(torch.isfinite(p).all() for p in pipe.unet.parameters())


@pytest.mark.slow
def test_checkpoints_on_s3_storage(ray_local, s3_env, bench, model_dir, tmp_path):
    """Checkpoints and run markers on a real S3 server (SeaweedFS); the workers were started before
    the AWS_* variables existed and reach the store through the options resolved on the driver."""
    req = make_request(bench, model_dir, tmp_path, workers=1, grad_accum=1, steps=4, checkpoint_every=2)
    req = req.model_copy(update={"checkpoint_root": s3_env.uri("runs")})
    result = unlearn(req)
    assert result.steps == 4 and load_pixel_model(result.output_dir).unet is not None
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=f"runs/{result.run_name}/")["Contents"]]
    assert any(k.endswith("checkpoint_000004/unet.safetensors") for k in keys)
    assert any(k.endswith("retrack_run.json") for k in keys)
    other = with_spec(req, train=req.spec.train.model_copy(update={"lr": 1e-3})).model_copy(update={"run_name": result.run_name, "output_dir": str(tmp_path / "o")})
    with pytest.raises(CheckpointMismatchError):
        unlearn(other)


def test_cli_runs_on_ray_and_reports_every_step(ray_local, bench, model_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    cli = typer.Typer()
    cli.command()(unlearn_command)
    args = [
        "--model-dir", str(model_dir), "--corpus-dir", str(bench.corpus), "--forget-ids", str(bench.forget_ids),
        "--output-dir", str(tmp_path / "cli-out"), "--method", "retrack", "--param", "k=4", "--param", "lambda=0.1",
        "--steps", "3", "--batch-size", "8", "--workers", "1", "--cpus-per-worker", "0.5", "--checkpoint-every", "0",
    ]
    # With no interval between progress lines, every step is one (the output is not a terminal).
    result = CliRunner().invoke(cli, args, env={"RETRACK_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0, result.output
    steps = re.findall(r"unlearn steps: (\d+/\d+) \(\d+%\), .*, loss [\d.e+-]+", result.output)
    assert steps == ["1/3", "2/3", "3/3"], result.output
    assert "wrote" in result.output and load_pixel_model(tmp_path / "cli-out").unet is not None
    bad = CliRunner().invoke(cli, args[:-6] + ["--workers", "2", "--grad-accum", "1"])
    assert bad.exit_code == 2 and "multiple of scaling.num_workers" in bad.output


# --------------------------------------------------------------------------- acceptance (slow)


def forget_frequency(model, forget_image01: np.ndarray, threshold: float, n: int, seed: int = 123) -> float:
    """Fraction of n DDIM samples within `threshold` (L2, [0, 1] pixels) of the planted image (method.md)."""
    from retrack.evaluation.sampling import generate

    samples = generate(model, n, seed=seed)
    d = np.sqrt(((samples - forget_image01) ** 2).reshape(n, -1).sum(1))
    return float((d < threshold).mean())


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_cpu_workers_unlearn_the_embedded_benchmark(ray_local, bench, memorising_model, tmp_path):
    """ReTrack with the paper's MNIST budget (batch 128, 50 steps, lr 5e-5) and lambda 0.05, K 10
    on two CPU workers: the planted image's frequency in samples
    drops, and the run is the single-process run."""
    from retrack.embedded.benchmark import BenchmarkInfo

    info = BenchmarkInfo.load(bench.root)
    corpus, forget = read_corpus(bench.corpus), read_forget_ids(bench.forget_ids)
    planted = (corpus.images[corpus.index_of(forget[:1])[0]] + 1.0) / 2.0
    n = int(os.environ.get("RETRACK_ACCEPTANCE_SAMPLES", "1000"))
    before = forget_frequency(load_pixel_model(memorising_model), planted, info.forget_threshold, n)

    req = stage_run(memorising_model, bench.corpus, bench.forget_ids, tmp_path, "unlearned", request_id="acceptance",
                    params={"lambda": 0.05, "k": 10}, steps=50, batch_size=128, grad_accum=2, lr=5e-5, checkpoint_every=10)
    result = unlearn(req)
    after = forget_frequency(load_pixel_model(result.output_dir), planted, info.forget_threshold, n)
    reference, history = single_process(bench, memorising_model, req)
    assert_same_curve(result.history, history)
    assert max_weight_diff(load_pixel_model(result.output_dir).unet, reference.unet) < WEIGHT_ATOL
    print(f"forget frequency: original {before:.4f} -> unlearned on 2 workers {after:.4f} ({n} samples)")
    assert before > 0.0, "the original model does not reproduce the planted image; pretrain longer"
    assert after <= 0.1 * before  # the foundation's figure: at most 10% of the original's frequency
