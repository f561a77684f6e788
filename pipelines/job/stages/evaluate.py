"""[evaluate] Sample the original and the unlearned model on the same seeds and score forgetting,
quality and integrity; the verdict says whether the items were forgotten within the quality gate.

Needs the unlearned model, the settled forget set and the corpus (its images read from storage
by the driver here).
`pipelines.evaluate.evaluate_request` (pixel DDPMs) or `evaluate_sd_request` (Stable Diffusion,
whose scoring reads the forgotten items' nearest retained items from the index) does the work.
Writes the report (`report/` under the job prefix: metrics, sample grids); its record holds the
verdict and the metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipelines.job.context import JobContext
from pipelines.progress import Report, stage_progress
from retrack.config.model_kind import ModelKind
from retrack.errors import InputError

if TYPE_CHECKING:
    from pipelines.evaluate import SdItems
    from retrack.data.corpus import Corpus
    from retrack.evaluation.pixel import EvalReference


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
    ref, threshold = evaluation_reference(ctx, forget)
    ev = evaluate_request(
        ctx.original_for_workers(), ctx.unlearned_uri(), ref, ev_spec.num_samples, ev_spec.seed,
        ev_spec.max_frequency_ratio, ev_spec.membership_alpha, ctx.jobdir.local / "report", spec.request_id, _context(ctx, forget),
        endpoint=spec.storage.endpoint_url, progress=progress,
    )
    ctx.jobdir.publish("report")
    return {"verdict": ev.verdict.label, "metrics": ev.metrics, "forget_threshold": threshold}


def evaluation_reference(ctx: JobContext, forget: list[str]) -> tuple["EvalReference", float]:
    """What pixel samples are scored against (retained data, the feature classifier trained on
    it, the copy threshold, held-out items), and the threshold used."""
    from retrack.evaluation.metrics import load_classifier, save_classifier, train_classifier
    from retrack.evaluation.pixel import build_reference

    corpus = ctx.pre.corpus  # labelled: preflight refuses a pixel job's corpus without labels
    keep = np.setdiff1d(np.arange(len(corpus)), corpus.index_of(forget))
    clf_dir = ctx.jobdir.fetch("classifier")
    if not (clf_dir / "model.safetensors").is_file():
        clf, _ = train_classifier(corpus.images[keep], corpus.labels[keep], seed=ctx.spec.evaluation.seed)
        save_classifier(clf, clf_dir)
        ctx.jobdir.publish("classifier")
    threshold = ctx.spec.evaluation.forget_threshold or _default_forget_threshold(corpus, forget)
    return build_reference(corpus, forget, threshold, load_classifier(clf_dir), ctx.pre.holdout), threshold


def _default_forget_threshold(corpus: "Corpus", forget: list[str]) -> float:
    """Half the [0,1]-pixel distance from the forget images to their nearest retained item (the
    rule the embedded benchmark uses), so a sample under it is closer to a forgotten image than
    to anything retained."""
    from retrack.data.corpus import to_unit_range
    from retrack.index.exact import exact_knn

    rows = corpus.index_of(forget)
    retained = np.delete(corpus.images, rows, axis=0)
    d, _ = exact_knn(to_unit_range(np.unique(corpus.images[rows], axis=0)), to_unit_range(retained), 1)
    return float(0.5 * d.min())


def _evaluate_sd(ctx: JobContext, progress: Report) -> dict:
    from pipelines.evaluate import evaluate_sd_request

    spec, jobdir = ctx.spec, ctx.jobdir
    forget = ctx.forget_set()
    items = sd_evaluation_items(ctx, forget)
    # s3:// models reach the Ray tasks as URIs (every node fetches them), local ones as their files.
    ev = evaluate_sd_request(
        ctx.original_for_workers(), ctx.unlearned_uri(), items, spec.evaluation, spec.evaluation.max_frequency_ratio, spec.evaluation.membership_alpha,
        jobdir.local / "report", spec.request_id, _context(ctx, forget), endpoint=spec.storage.endpoint_url, progress=progress,
    )
    jobdir.publish("report")
    return {"verdict": ev.verdict.label, "metrics": ev.metrics, "forget_threshold": spec.evaluation.forget_threshold}


def sd_evaluation_items(ctx: JobContext, forget: list[str]) -> "SdItems":
    """What the SD evaluation reads from the corpus: the forgotten items, their nearest retained
    items in the index (VAE latents: they calibrate each item's copy threshold), a seeded sample
    of retained captions that are not also a forgotten item's caption (integrity), the held-out items."""
    from pipelines.evaluate import SdItems
    from retrack.data.corpus import from_model_space
    from retrack.index import find_neighbours, open_index

    spec, corpus, idx = ctx.spec, ctx.pre.corpus, ctx.records["index"]
    rows = corpus.index_of(forget)
    index = open_index(idx["index_uri"], endpoint=spec.storage.endpoint_url, manifest_digest=idx["manifest_digest"])
    k = min(spec.evaluation.stable_diffusion.candidates, len(corpus) - len(forget))
    nb = find_neighbours(index, forget, k, margin=spec.index.candidates_margin)
    forget_captions = [corpus.captions[r] for r in rows]
    banned = set(forget_captions)
    keep = [int(r) for r in np.setdiff1d(np.arange(len(corpus)), rows) if corpus.captions[r] not in banned]
    if not keep:
        raise InputError("no retained item has a caption other than the forgotten items': integrity needs retained captions")
    n = spec.evaluation.num_samples
    picked = np.random.default_rng(spec.evaluation.seed).choice(keep, n, replace=len(keep) < n)
    holdout = ctx.pre.holdout
    return SdItems(
        forget_images=from_model_space(corpus.images[rows]),
        forget_ids=list(forget),
        forget_captions=forget_captions,
        candidates=[(from_model_space(corpus.images[corpus.index_of(ids)]), list(ids)) for ids in nb.ids],
        integrity_captions=[corpus.captions[r] for r in picked],
        holdout_images=None if holdout is None else from_model_space(holdout.images),
        holdout_ids=None if holdout is None else holdout.ids,
        holdout_captions=None if holdout is None else holdout.captions,
    )
