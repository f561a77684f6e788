"""[evaluate] Sample the original and the unlearned model on the same seeds and score forgetting,
quality and integrity; the verdict says whether the items were forgotten within the quality gate.

Needs the unlearned model, the settled forget set, the index and the corpus: of the corpus only
the forgotten items, their nearest retained items and a seeded sample of retained items are
fetched (`pipelines.job.reference`). `pipelines.evaluate.evaluate_request` (pixel DDPMs) or
`evaluate_sd_request` (Stable Diffusion) does the work.
Writes the report (`report/` under the job prefix: metrics, sample grids); its record holds the
verdict and the metrics and, for Stable Diffusion, how many held-out items were read from the
item cache and how many encoded.
"""

from __future__ import annotations

from pipelines.job.context import JobContext
from pipelines.job.reference import pixel_reference, sd_evaluation_items
from pipelines.progress import Report, stage_progress
from retrack.config.model_kind import ModelKind
from retrack.data.item_cache import ItemCache


def run(ctx: JobContext) -> dict:
    with stage_progress("evaluate") as progress:
        return (_evaluate_sd if ctx.spec.model.kind is ModelKind.STABLE_DIFFUSION else _evaluate_pixel)(ctx, progress)


def _context(ctx: JobContext, forget: list[str]) -> dict:
    """What the report states about the run it scores."""
    spec = ctx.spec
    return {"model_digest": ctx.records["unlearn"]["model_digest"], "config_hash": spec.config_hash(), "method": spec.method.name,
            "forget_count": len(forget), "samples_per_model": spec.evaluation.num_samples}


def _evaluate_pixel(ctx: JobContext, progress: Report) -> dict:
    from pipelines.evaluate import evaluate_request

    spec, ev_spec = ctx.spec, ctx.spec.evaluation
    forget = ctx.forget_set()
    ref, threshold = pixel_reference(ctx, forget)
    ev = evaluate_request(
        ctx.original_for_workers(), ctx.unlearned_uri(), ref, ev_spec.num_samples, ev_spec.seed,
        ev_spec.max_frequency_ratio, ev_spec.membership_alpha, ctx.jobdir.local / "report", spec.request_id, _context(ctx, forget),
        endpoint=spec.storage.endpoint_url, progress=progress,
    )
    ctx.jobdir.publish("report")
    return {"verdict": ev.verdict.label, "metrics": ev.metrics, "forget_threshold": threshold}


def _evaluate_sd(ctx: JobContext, progress: Report) -> dict:
    from pipelines.evaluate import evaluate_sd_request

    spec, jobdir, pre = ctx.spec, ctx.jobdir, ctx.pre
    forget = ctx.forget_set()
    items = sd_evaluation_items(ctx, forget)
    # The held-out items' encodings are kept beside the corpus items' (keyed by the held-out set).
    cache = None if pre.holdout_source is None else \
        ItemCache.for_model(ctx.storage / "cache" / "items", pre.holdout_source.digest(), pre.model_dir, pre.geometry[0])
    # s3:// models reach the Ray tasks as URIs (every node fetches them), local ones as their files.
    ev = evaluate_sd_request(
        ctx.original_for_workers(), ctx.unlearned_uri(), items, spec.evaluation, spec.evaluation.max_frequency_ratio, spec.evaluation.membership_alpha,
        jobdir.local / "report", spec.request_id, _context(ctx, forget), endpoint=spec.storage.endpoint_url, progress=progress,
        holdout_cache=cache,
    )
    jobdir.publish("report")
    return {"verdict": ev.verdict.label, "metrics": ev.metrics, "forget_threshold": spec.evaluation.forget_threshold,
            **({} if ev.holdout_items is None else {"holdout_items": ev.holdout_items})}
