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
    from pipelines import index_cli, queue, unlearn

    app.command("unlearn", help="Unlearn the listed items from a diffusion model with Ray Train (every input checked first).")(refusing_bad_input(unlearn.unlearn_command))

    app.add_typer(index_cli.cli, name="index", help="Build the corpus kNN index; find neighbours and near-duplicates.")
    app.add_typer(queue.cli, name="queue", help="The deletion queue: submit requests, run the pending ones as one batch job.")
    from pipelines.audit import audit_command

    app.command("audit", help="The audit trail: a request's record, every request against a model, a version's lineage.")(refusing_bad_input(audit_command))


@app.command()
@refusing_bad_input
def pretrain(
    preset: str = typer.Option("full", help="Pretraining preset: full or quick."),
    scenario: str = typer.Option("digits", help="Embedded scenario: digits, or fashion-mnist when its files exist."),
) -> None:
    """Build the embedded benchmark and pretrain the original and retrained DDPMs (cached)."""
    from pipelines.progress import console, stage_bar
    from retrack.embedded.pretrain import PRESETS, ensure_pretrained
    from retrack.embedded.workspace import Workspace

    ws = Workspace.default(scenario)
    steps = PRESETS[preset].steps if preset in PRESETS else 0
    with stage_bar("pretrain", 2 * steps) as advance:
        off = {"original": 0, "retrained": steps}
        pre = ensure_pretrained(ws, preset, progress=lambda w, s, _n: advance(off[w] + s, w))
    console.print(f"original: {pre.original} ({pre.original_seconds:.0f} s)\nretrained: {pre.retrained} ({pre.retrained_seconds:.0f} s)")


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
    from retrack.embedded.benchmark import BenchmarkInfo
    from retrack.data.corpus import read_corpus, read_forget_ids
    from retrack.evaluation.pixel import build_reference, evaluate_model
    from retrack.evaluation.metrics import load_classifier
    from retrack.models.pixel import check_pixel_model_dir, load_pixel_model
    from retrack.embedded.pretrain import ensure_pretrained
    from retrack.embedded.workspace import Workspace

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
    from retrack.config.spec import load_spec

    print_summary(run_job(load_spec(job), address=address))


@app.command()
@refusing_bad_input
def tune(
    job: Path = typer.Argument(..., help="Job spec (YAML) with a `tune` section; see `retrack schema`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)."),
) -> None:
    """Search the method's hyperparameters with Ray Tune, print the Pareto front of forgetting vs
    quality, then evaluate and register the chosen configuration. Rerun to resume."""
    from pipelines.demo import print_summary
    from pipelines.tune import run_tune
    from retrack.config.spec import load_spec

    print_summary(run_tune(load_spec(job), address=address).job)


@app.command()
@refusing_bad_input
def validate(job: Path = typer.Argument(..., help="Job spec (YAML).")) -> None:
    """Check a job spec without running anything; exit 2 naming each invalid field."""
    from retrack.config.spec import load_spec

    spec = load_spec(job)
    typer.echo(f"{job}: valid (request {spec.request_id}, method {spec.method.name}, config hash {spec.config_hash()})")


@app.command()
def schema() -> None:
    """Print the job spec's JSON schema."""
    from retrack.config.spec import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


_mount_stage_commands()


def main() -> None:
    app()
