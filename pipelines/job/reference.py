"""What the evaluation reads of the corpus, fetched by row (`pipelines.items`), never the corpus
itself: the forgotten items, their nearest retained items (from the index), and a seeded block
sample of the retained items (`evaluation.reference_items`; all of a smaller corpus). For Stable
Diffusion the latents of the first two come from the index itself, and only captions from the
corpus.

For a pixel DDPM the sample trains the feature network and gives the Fréchet reference
statistics; both are kept under `<storage root>/references/<key>`, the key naming the corpus, the
sample, the forget set and the copy threshold, so every job of the same request on the same corpus
(a rerun with other settings, each tuning trial) reuses them instead of fetching the sample again.
Nothing of the forgotten items is kept there: they are fetched by each job.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.items import fetch_items
from retrack.data.corpus import from_model_space, to_model_space
from retrack.data.sample import block_sample
from retrack.digest import config_digest, ids_digest
from retrack.errors import InputError

if TYPE_CHECKING:
    from pipelines.evaluate import SdItems
    from pipelines.job.context import JobContext
    from retrack.evaluation.pixel import EvalReference
    from retrack.index import Neighbours

STATS = "stats.safetensors"  # written last: its presence marks a complete reference


def _nearest_retained(ctx: "JobContext", forget: list[str], k: int) -> "Neighbours":
    """The K nearest retained items of every forgotten item, from the job's index."""
    from pipelines.index import serve_index
    from retrack.index import find_neighbours

    spec, idx = ctx.spec, ctx.records["index"]
    index = serve_index(idx["index_uri"], endpoint=spec.storage.endpoint_url, manifest_digest=idx["manifest_digest"])
    return find_neighbours(index, forget, k, margin=spec.index.candidates_margin)


def _retained_sample(ctx: "JobContext", forget_rows: np.ndarray) -> np.ndarray:
    ev, n = ctx.spec.evaluation, ctx.pre.corpus_index.count
    return np.setdiff1d(block_sample(n, ev.reference_items, ev.seed), forget_rows)


def pixel_reference(ctx: "JobContext", forget: list[str]) -> tuple["EvalReference", float]:
    """What pixel samples are scored against (the reference statistics, the feature network, the
    copy threshold, the forgotten and held-out items), and the threshold used. The default
    threshold is half the [0, 1]-pixel distance from the forgotten items to their nearest retained
    item (the neighbours stage measured it on the index, whose vectors are model-space pixels:
    twice the [0, 1] distance), so a sample under it is closer to a forgotten image than to
    anything retained."""
    from retrack.evaluation.metrics import ReferenceStats, load_classifier, save_classifier, train_classifier
    from retrack.evaluation.pixel import EvalReference, reference_of
    from retrack.storage.tree import download_tree, upload_tree

    ev, corpus, shape = ctx.spec.evaluation, ctx.pre.corpus_index, ctx.pre.geometry
    nearest = ctx.records["neighbours"].get("nearest_retained_distance")  # absent from records of earlier versions
    if nearest is None:
        nearest = float(_nearest_retained(ctx, forget, 1).distances[:, 0].min())
    threshold = ev.forget_threshold or 0.25 * nearest
    forget_rows = corpus.rows_of(forget)
    forget_m11 = to_model_space(fetch_items(corpus, np.unique(forget_rows), shape)["image"])
    holdout = None if ctx.pre.holdout is None else ctx.pre.holdout.images
    key = config_digest({"corpus": ctx.pre.corpus_key, "items": ev.reference_items, "seed": ev.seed,
                         "forget": ids_digest(forget), "threshold": threshold})[:16]
    where = ctx.storage / "references" / key
    with tempfile.TemporaryDirectory() as tmp:
        if (where / STATS).exists():
            classifier = load_classifier(download_tree(where / "classifier", Path(tmp) / "classifier"))
            stats = ReferenceStats.load(download_tree(where / STATS, Path(tmp) / STATS))
            return EvalReference(np.unique(forget_m11, axis=0), threshold, stats, holdout, classifier), threshold
        sample = fetch_items(corpus, _retained_sample(ctx, forget_rows), shape)
        retained = to_model_space(sample["image"])
        classifier, _ = train_classifier(retained, sample["label"], seed=ev.seed)
        ref = reference_of(forget_m11, retained, threshold, classifier, holdout)
        save_classifier(classifier, Path(tmp) / "classifier")
        upload_tree(Path(tmp) / "classifier", where / "classifier")
        ref.reference.save(Path(tmp) / STATS)
        upload_tree(Path(tmp) / STATS, where / STATS)
    return ref, threshold


def sd_evaluation_items(ctx: "JobContext", forget: list[str]) -> "SdItems":
    """What the Stable Diffusion evaluation reads: the forgotten items' and their nearest retained
    items' latents from the job's index (which holds every item's latent, encoded once by the
    model's VAE: they calibrate each item's copy threshold, and no VAE runs again for them), the
    forgotten items' captions and retained captions from the seeded sample that are not also a
    forgotten item's caption (one same-seed pair of generations each, for integrity) from the
    corpus, the held-out items."""
    from pipelines.evaluate import SdItems

    spec, corpus, geometry = ctx.spec, ctx.pre.corpus_index, ctx.pre.geometry
    forget_rows = corpus.rows_of(forget)
    k = min(spec.evaluation.stable_diffusion.candidates, corpus.count - len(forget))
    nb = _nearest_retained(ctx, forget, k)
    read = fetch_items(corpus, np.unique(forget_rows), geometry, images=False)
    caption_of = dict(zip(read["row"].tolist(), read["caption"].tolist()))
    forget_captions = [str(caption_of[int(r)]) for r in forget_rows]
    banned = set(forget_captions)
    pool = fetch_items(corpus, _retained_sample(ctx, forget_rows), geometry, images=False)["caption"]
    keep = [str(c) for c in pool if c not in banned]
    if not keep:
        raise InputError("no retained item has a caption other than the forgotten items': integrity needs retained captions")
    n = spec.evaluation.num_samples
    picked = np.random.default_rng(spec.evaluation.seed).choice(len(keep), n, replace=len(keep) < n)
    holdout = ctx.pre.holdout
    return SdItems(
        forget_latents=nb.forget_vectors,
        forget_captions=forget_captions,
        candidates=list(nb.vectors),
        integrity_captions=[keep[i] for i in picked],
        holdout_images=None if holdout is None else from_model_space(holdout.images),
        holdout_ids=None if holdout is None else holdout.ids,
        holdout_captions=None if holdout is None else holdout.captions,
    )
