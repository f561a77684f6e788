"""[unlearn] Ray Train: TorchTrainer workers run the method (ReTrack by default) with DDP,
checkpoint to storage and resume after a failure.

Needs the original model, the corpus, the neighbours stage's forget set and neighbours and, for
Stable Diffusion, the index stage's index (the items' latents), all by URI (the workers read them
from storage themselves).
`pipelines.unlearn.driver.unlearn` does the work (`train` below is the job's one call into it; tuning
trials use it too). Writes the unlearned model (`model/` under the job prefix, completion marker last); its record holds
the model's digest, the wall time, the step it resumed from and, for Stable Diffusion, how many
items came from the item cache, how many took their latents from the index (only their captions
encoded) and how many were encoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.job.context import JobContext
from pipelines.progress import Report, stage_progress
from retrack.config.model_kind import ModelKind

if TYPE_CHECKING:
    from pipelines.unlearn.driver import TrainMonitor, UnlearnResult


def run(ctx: JobContext) -> dict:
    with stage_progress("unlearn") as progress:
        result = train(ctx, ctx.unlearned_uri(), ctx.spec.run_name, progress=progress)
    return {"model_digest": result.digest, "wall_seconds": result.seconds, "steps": result.steps,
            "final_loss": result.history[-1]["loss"] if result.history else None, "resumed_from": result.resumed_from,
            **({} if result.items is None else {"items": result.items})}


def train(ctx: JobContext, output: str, run_name: str, monitor: "TrainMonitor | None" = None, progress: Report | None = None) -> "UnlearnResult":
    """Unlearn with `ctx.spec`'s method and training settings (a tuning trial's context carries
    its own) into `output` (a URI)."""
    from pipelines.unlearn.driver import unlearn
    from pipelines.unlearn.progress import step_progress
    from retrack.config.unlearn_run import UnlearnRun

    spec, remote = ctx.spec, ctx.jobdir.remote
    # Every input by URI: the neighbours stage's forget set and neighbours are under the job prefix.
    stage = spec.model_copy(update={"forget": spec.forget.model_copy(update={"ids": None, "images": None, "file": str(remote / "forget_ids.txt")})})
    run = UnlearnRun(
        spec=stage,
        output_dir=output,
        checkpoint_root=str(ctx.storage / "checkpoints"),
        item_cache=str(ctx.storage / "cache" / "items"),  # shared by every job on this storage
        # Stable Diffusion: the index stage's index holds every item's latent (it was built with the model's VAE).
        index=ctx.records["index"]["index_uri"] if spec.model.kind is ModelKind.STABLE_DIFFUSION else None,
        neighbours_file=str(remote / "neighbours.json") if spec.method.needs_neighbours else None,
        run_name=run_name,
    )
    return unlearn(run, address=ctx.address, monitor=monitor, corpus=ctx.pre.corpus_index,
                   progress=None if progress is None else step_progress(progress))
