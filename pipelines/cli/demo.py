"""`retrack pretrain | evaluate | demo`: the embedded benchmark (no network, GPU or service)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.cli.refusal import refusing_bad_input


@refusing_bad_input
def pretrain(
    preset: str = typer.Option("full", help="Pretraining preset: full or quick."),
    scenario: str = typer.Option("digits", help="Embedded scenario: digits, or fashion-mnist when its files exist."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Train anew, even where cached or shipped weights exist."),
) -> None:
    """Build the embedded benchmark and pretrain the original and retrained DDPMs (cached; the
    originals and the feature classifier ship with retrack)."""
    from pipelines.progress import console, stage_progress
    from retrack.embedded.pretrain import ensure_pretrained
    from retrack.embedded.workspace import Workspace

    ws = Workspace.default(scenario)
    with stage_progress("pretrain") as progress:
        pre = ensure_pretrained(ws, preset, progress=progress, reuse=not from_scratch)
    console.print(f"original: {pre.original} ({pre.original_seconds:.0f} s)\nretrained: {pre.retrained} ({pre.retrained_seconds:.0f} s)")


@refusing_bad_input
def evaluate(
    model: Path = typer.Argument(..., help="Unlearned model directory (diffusers layout)."),
    preset: str = typer.Option("full", help="Pretraining preset whose original model is the reference."),
    samples: int = typer.Option(2000, min=1, help="Samples drawn per model."),
    scenario: str = typer.Option("digits"),
) -> None:
    """Score a model on the embedded benchmark against the original (same-seed samples)."""
    from pipelines.progress import print_metrics, stage_progress
    from retrack.data.corpus import read_corpus
    from retrack.data.forget import read_forget_ids
    from retrack.embedded.benchmark import BenchmarkInfo
    from retrack.embedded.pretrain import ensure_pretrained
    from retrack.embedded.workspace import Workspace
    from retrack.evaluation.metrics import load_classifier
    from retrack.evaluation.pixel import build_reference, evaluate_model
    from retrack.models.pixel import check_pixel_model_dir, load_pixel_model

    check_pixel_model_dir(model)
    ws = Workspace.default(scenario)
    pre = ensure_pretrained(ws, preset, models=("original",))
    corpus = read_corpus(ws.benchmark.corpus)
    ref = build_reference(corpus, read_forget_ids(ws.benchmark.forget_ids), BenchmarkInfo.load(ws.benchmark.root).forget_threshold, load_classifier(pre.classifier))
    rows = {}
    with stage_progress("evaluate") as progress:
        rows["original"], before = evaluate_model(load_pixel_model(pre.original), ref, samples,
                                                  progress=lambda done, n: progress("original samples", done, n))
        rows[str(model)], _ = evaluate_model(load_pixel_model(model), ref, samples, original_samples01=before,
                                             progress=lambda done, n: progress("unlearned samples", done, n))
    print_metrics("embedded benchmark", rows)


@refusing_bad_input
def demo(
    quick: bool = typer.Option(False, "--quick", help="A few minutes on 2 cores: smaller pretraining and fewer samples."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local instance)."),
) -> None:
    """Run the embedded default end to end: pretrain (cached), then index, neighbours, unlearn,
    evaluate and register, exactly as `retrack run` does."""
    from pipelines.cli.job import finish
    from pipelines.job import run_job
    from pipelines.progress import console, stage_progress
    from retrack.embedded.demo import demo_spec
    from retrack.embedded.pretrain import ensure_pretrained
    from retrack.embedded.workspace import Workspace

    ws = Workspace.default()
    with stage_progress("pretrain") as progress:
        ensure_pretrained(ws, "quick" if quick else "full", progress=progress, models=("original",))
    if not progress.parts:
        console.print("pretrain: cached or shipped weights are used")
    finish(run_job(demo_spec(ws, quick), address=address))
