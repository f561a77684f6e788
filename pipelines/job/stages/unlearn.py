"""[unlearn] Ray Train: TorchTrainer workers run the method (ReTrack by default) with DDP,
checkpoint to storage and resume after a failure.

Needs the original model, the corpus, and the neighbours stage's forget set and neighbours.
`pipelines.unlearn.unlearn` does the work (`train` below is the job's one call into it; tuning
trials use it too). Writes the unlearned model (`model/` under the job prefix); its record holds
the model's digest, the wall time and the step it resumed from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.job.context import JobContext

if TYPE_CHECKING:
    from pipelines.unlearn import TrainMonitor, UnlearnResult


def run(ctx: JobContext) -> dict:
    result = train(ctx, ctx.jobdir.local / "model", ctx.spec.run_name)
    ctx.jobdir.publish("model")
    return {"model_digest": result.digest, "wall_seconds": result.seconds, "steps": result.steps,
            "final_loss": result.history[-1]["loss"] if result.history else None, "resumed_from": result.resumed_from}


def train(ctx: JobContext, output_dir: Path, run_name: str, monitor: "TrainMonitor | None" = None) -> "UnlearnResult":
    """Unlearn with `ctx.spec`'s method and training settings (a tuning trial's context carries
    its own) into `output_dir`."""
    from pipelines.unlearn import ScalingSettings, UnlearnRequest, unlearn

    spec, jobdir = ctx.spec, ctx.jobdir
    request = UnlearnRequest(
        request_id=spec.request_id,
        model_dir=ctx.original_for_workers(),
        model_kind="sd" if spec.model.kind == "stable-diffusion" else "pixel",
        corpus_dir=str(ctx.pre.corpus_dir),
        forget_ids_file=str(jobdir.fetch("forget_ids.txt")),
        neighbours_file=str(jobdir.fetch("neighbours.json")) if spec.method.needs_neighbours else None,
        method=spec.method,
        train=spec.train,
        scaling=ScalingSettings(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu, cpus_per_worker=spec.scaling.cpus_per_worker),
        max_failures=spec.scaling.max_failures,
        storage_path=str(ctx.storage / "checkpoints"),
        output_dir=str(output_dir),
        run_name=run_name,
        storage_endpoint=spec.storage.endpoint_url,
    )
    return unlearn(request, address=ctx.address, monitor=monitor)
