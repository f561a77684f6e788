"""The `retrack` command line. Stage modules are imported inside commands so `--help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipelines.refusal import refusing_bad_input

app = typer.Typer(
    help="Make a trained diffusion model forget specific training data (ReTrack and baselines, on Ray).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _mount_stage_commands() -> None:
    """Stage sub-commands live beside their stage (they import Ray lazily)."""
    from pipelines import index, queue

    app.add_typer(index.cli, name="index", help="Build the corpus kNN index; find neighbours and near-duplicates.")
    app.add_typer(queue.cli, name="queue", help="The deletion queue: submit requests, run the pending ones as one batch job.")


def _params(text: str) -> dict:
    from retrack.errors import InputError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--params is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InputError("--params must be a JSON object, e.g. '{\"lambda\": 0.05, \"k\": 10}'")
    return value


@app.command()
@refusing_bad_input
def pretrain(
    preset: str = typer.Option("full", help="Pretraining preset: full or quick."),
    scenario: str = typer.Option("digits", help="Embedded scenario: digits, or fashion-mnist when its files exist."),
) -> None:
    """Build the embedded benchmark and pretrain the original and retrained DDPMs (cached)."""
    from pipelines.progress import console, stage_bar
    from retrack.pretrain import PRESETS, ensure_pretrained
    from retrack.workspace import Workspace

    ws = Workspace.default(scenario)
    steps = PRESETS[preset].steps if preset in PRESETS else 0
    with stage_bar("pretrain", 2 * steps) as advance:
        off = {"original": 0, "retrained": steps}
        pre = ensure_pretrained(ws, preset, progress=lambda w, s, _n: advance(off[w] + s, w))
    console.print(f"original: {pre.original} ({pre.original_seconds:.0f} s)\nretrained: {pre.retrained} ({pre.retrained_seconds:.0f} s)")


@app.command()
@refusing_bad_input
def unlearn(
    model: Path = typer.Option(..., help="Original model directory (diffusers DDPM pipeline layout)."),
    corpus: Path = typer.Option(..., help="Corpus directory: parquet shards of (id, image[, label][, caption])."),
    forget_ids: Path = typer.Option(..., help="File with one id to forget per line."),
    out: Path = typer.Option(..., help="Where the unlearned model is written (diffusers layout)."),
    method: str = typer.Option("retrack", help="retrack, vanilla, neggrad, erasediff or siss."),
    params: str = typer.Option("{}", help='Method parameters as JSON, e.g. \'{"lambda": 0.05, "k": 10}\'.'),
    steps: int = typer.Option(50, help="Optimiser updates."),
    batch_size: int = typer.Option(128, help="Batch per branch."),
    lr: float = typer.Option(5e-5, help="AdamW learning rate."),
    seed: int = typer.Option(0),
) -> None:
    """Unlearn the forget set from a pixel DDPM in this process (every input checked first)."""
    from pipelines.progress import console, stage_bar
    from retrack.config import MethodConfig, TrainConfig
    from retrack.corpus import read_corpus, read_forget_ids
    from retrack.models import check_pixel_model_dir, load_pixel_model, save_pixel_model
    from retrack.unlearn import run_unlearning, split_for_unlearning

    method_cfg = MethodConfig.model_validate({"name": method, "params": _params(params)})
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    check_pixel_model_dir(model)
    data = split_for_unlearning(read_corpus(corpus), read_forget_ids(forget_ids), method_cfg)
    pixel = load_pixel_model(model)
    if tuple(data.retain.shape[1:]) != pixel.image_shape:
        from retrack.errors import InputError

        raise InputError(f"corpus images are {tuple(data.retain.shape[1:])}, the model expects {pixel.image_shape}")
    with stage_bar(f"unlearn ({method})", steps) as advance:
        _, secs = run_unlearning(pixel, data, method_cfg, train, progress=lambda s, logs: advance(s, f"loss {logs['loss']:.3g}"))
    digest = save_pixel_model(pixel, out, metadata={"method": method_cfg.model_dump(), "wall_seconds": secs})
    console.print(f"unlearned model: {out} (sha256 {digest[:12]}, {secs:.1f} s)")


@app.command()
@refusing_bad_input
def evaluate(
    model: Path = typer.Argument(..., help="Unlearned model directory (diffusers layout)."),
    preset: str = typer.Option("full", help="Pretraining preset whose original model is the reference."),
    samples: int = typer.Option(2000, min=1, help="Samples drawn per model."),
    scenario: str = typer.Option("digits"),
) -> None:
    """Score a model on the embedded benchmark against the original (same-seed samples)."""
    from pipelines.demo import print_metrics
    from retrack.benchmark import BenchmarkInfo
    from retrack.corpus import read_corpus, read_forget_ids
    from retrack.evaluation import build_reference, evaluate_model
    from retrack.metrics import load_classifier
    from retrack.models import check_pixel_model_dir, load_pixel_model
    from retrack.pretrain import ensure_pretrained
    from retrack.workspace import Workspace

    check_pixel_model_dir(model)
    ws = Workspace.default(scenario)
    pre = ensure_pretrained(ws, preset)
    corpus = read_corpus(ws.benchmark.corpus)
    ref = build_reference(corpus, read_forget_ids(ws.benchmark.forget_ids), BenchmarkInfo.load(ws.benchmark.root).forget_threshold, load_classifier(pre.classifier))
    rows = {}
    rows["original"], before = evaluate_model(load_pixel_model(pre.original), ref, samples)
    rows[str(model)], _ = evaluate_model(load_pixel_model(model), ref, samples, original_samples01=before)
    print_metrics("embedded benchmark", rows)


@app.command()
@refusing_bad_input
def demo(
    quick: bool = typer.Option(False, "--quick", help="A few minutes on 2 cores: smaller pretraining and fewer samples."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local instance)."),
) -> None:
    """Run the embedded default end to end: pretrain (cached), then index, neighbours, unlearn,
    evaluate and register, exactly as `retrack run` does."""
    from pipelines.demo import run_demo

    run_demo(quick=quick, address=address)


@app.command()
@refusing_bad_input
def run(
    job: Path = typer.Argument(..., help="Job spec (YAML); see `retrack schema`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)."),
) -> None:
    """Run one deletion request: index -> neighbours -> unlearn -> evaluate -> register.
    Completed stages are skipped on rerun."""
    from pipelines.demo import print_summary
    from pipelines.job import run_job
    from retrack.spec import load_spec

    print_summary(run_job(load_spec(job), address=address))


@app.command()
@refusing_bad_input
def validate(job: Path = typer.Argument(..., help="Job spec (YAML).")) -> None:
    """Check a job spec without running anything; exit 2 naming each invalid field."""
    from retrack.spec import load_spec

    spec = load_spec(job)
    typer.echo(f"{job}: valid (request {spec.request_id}, method {spec.method.name}, config hash {spec.config_hash()})")


@app.command()
def schema() -> None:
    """Print the job spec's JSON schema."""
    from retrack.spec import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


_mount_stage_commands()


def main() -> None:
    app()
