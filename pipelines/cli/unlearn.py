"""`retrack unlearn`: its options build the same `UnlearnSpec` a job spec's unlearn stage gets."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from retrack.config.model_kind import ModelKind
from retrack.config.spec import CorpusSpec, ForgetSpec, ModelSpec, ScalingSpec, StorageSpec, UnlearnSpec
from retrack.config.train import MethodConfig, TrainConfig
from retrack.config.unlearn_run import UnlearnRun
from retrack.errors import InputError, RetrackError, describe_validation_error


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _parse_json_params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--params is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InputError('--params must be a JSON object, e.g. \'{"lambda": 0.5, "k": 10}\'')
    return value


def _model_kind(name: str, model_dir: str) -> ModelKind:
    if name == "auto":
        from retrack.training.prepare import detect_model_kind

        return detect_model_kind(model_dir)
    return ModelKind.parse(name)


def unlearn_command(
    model_dir: str = typer.Option(..., "--model-dir", "--model", help="Diffusers model directory (pixel DDPM or Stable Diffusion), local or s3://."),
    corpus_dir: str = typer.Option(..., "--corpus-dir", "--corpus", help="Corpus location, local or s3:// (see --format)."),
    corpus_format: str = typer.Option("parquet", "--format", help="Corpus format: parquet, imagefolder or webdataset."),
    forget_ids: str = typer.Option(..., "--forget-ids", help="File with one id to forget per line."),
    output_dir: str = typer.Option(..., "--output-dir", "--out", help="Where the unlearned model is written (diffusers layout)."),
    method: str = typer.Option("retrack", "--method", help="retrack, vanilla, neggrad, erasediff or siss."),
    params: str = typer.Option("{}", "--params", help='Method parameters as JSON, e.g. \'{"lambda": 0.5, "k": 10}\'.'),
    param: list[str] = typer.Option([], "--param", help="One method parameter KEY=VALUE (repeatable; wins over --params)."),
    steps: int = typer.Option(50, "--steps"),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch per branch."),
    forget_batch_size: Optional[int] = typer.Option(None, "--forget-batch-size", help="Global forget-branch batch, when it should differ from --batch-size."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Global micro-batches per update (default: the worker count)."),
    lr: float = typer.Option(5e-5, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, bf16 (CPU or GPU) or fp16 (GPU, dynamic loss scale)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every"),
    workers: int = typer.Option(1, "--workers"),
    gpu: bool = typer.Option(False, "--gpu"),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker"),
    neighbours: Optional[str] = typer.Option(None, "--neighbours", help="Neighbours JSON from the index stage."),
    index: Optional[str] = typer.Option(None, "--index", help=(
        "Stable Diffusion: the corpus's index built with this model's VAE (`retrack index build --encoder vae`): "
        "the items' latents are read from it, not encoded again.")),
    model_kind: str = typer.Option("auto", "--model-kind", help="auto (from the directory), pixel-ddpm (pixel) or stable-diffusion (sd)."),
    request_id: str = typer.Option("manual", "--request-id"),
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Checkpoint storage (default: <output-dir>.runs)."),
    max_failures: int = typer.Option(2, "--max-failures"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local instance)."),
) -> None:
    """Unlearn the listed items from a diffusion model with Ray Train."""
    from pydantic import ValidationError

    try:
        storage = storage_path or f"{output_dir.rstrip('/')}.runs"
        spec = UnlearnSpec(
            request_id=request_id,
            model=ModelSpec(uri=model_dir, kind=_model_kind(model_kind, model_dir)),
            corpus=CorpusSpec(uri=corpus_dir, format=corpus_format),
            forget=ForgetSpec(file=forget_ids),
            method=MethodConfig(name=method, params={**_parse_json_params(params), **_parse_params(param)}),
            train=TrainConfig(
                steps=steps, batch_size=batch_size, forget_batch_size=forget_batch_size, grad_accum=grad_accum or max(workers, 1), lr=lr, seed=seed,
                mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every,
            ),
            scaling=ScalingSpec(num_workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures),
            storage=StorageSpec(root=storage),
        )
        run = UnlearnRun(spec=spec, output_dir=output_dir, checkpoint_root=storage, neighbours_file=neighbours, index=index)
        from pipelines.progress import stage_progress
        from pipelines.unlearn.driver import unlearn
        from pipelines.unlearn.progress import step_progress

        with stage_progress("unlearn") as progress:
            result = unlearn(run, progress=step_progress(progress), address=address)
    except RetrackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        typer.echo(f"error: invalid settings: {describe_validation_error(exc)}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if result.skipped:
        typer.echo(f"already done: {result.output_dir} (sha256 {result.digest})")
    else:
        typer.echo(f"wrote {result.output_dir} (sha256 {result.digest}) after {result.steps} steps in {result.seconds:.1f}s")
        if result.items is not None:
            typer.echo(f"items: {result.items['cached']} from the item cache, {result.items['from_index']} with their latents "
                       f"from the index, {result.items['encoded']} encoded")
