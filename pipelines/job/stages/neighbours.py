"""[neighbours] Look up the K nearest retained items of every item to forget.

Needs the index stage's record and the requested forget ids; a request by picture gets its ids
here, from the index (`retrack.index.query.match_images`: every item within the duplicate
threshold of a picture). `retrack.index.find_duplicates` then applies the spec's near-duplicate
policy (copies of a forgotten item are refused, reported or forgotten too), and `find_neighbours`
searches the index, served by one Ray actor per shard (`pipelines.index.serve_index`: the driver
never holds it). Writes the settled forget set
(`forget_ids.txt`) and the neighbours (`neighbours.json`) under the job prefix; its record holds
the forget set's digest and count, never the ids, and the distance from the forget set to its
nearest retained item (the evaluation's default copy threshold derives from it).
"""

from __future__ import annotations

import numpy as np

from pipelines.job.context import JobContext
from pipelines.progress import console
from retrack.data.neighbours import write_neighbours
from retrack.digest import ids_digest


def run(ctx: JobContext) -> dict:
    from pipelines.index import serve_index
    from retrack.index import find_duplicates, find_neighbours
    from retrack.index.query import match_images
    from retrack.training.loop import check_k

    spec, idx = ctx.spec, ctx.records["index"]
    index = serve_index(idx["index_uri"], endpoint=spec.storage.endpoint_url, manifest_digest=idx["manifest_digest"])
    threshold = spec.forget.duplicate_threshold or _default_duplicate_threshold(index)
    requested = ctx.pre.forget_ids
    if ctx.pre.forget_images is not None:
        requested = match_images(index, ctx.pre.forget_images, threshold)
        console.print(f"forget.images: {len(ctx.pre.forget_images.images)} picture(s) matched {len(requested)} corpus item(s)")
        if spec.method.needs_neighbours:
            check_k(spec.method.k, len(index) - len(requested))
    report = find_duplicates(index, requested, threshold, policy=spec.forget.duplicates)
    if report.count:
        console.print(f"near-duplicates of the forget set: {report.count} (policy {spec.forget.duplicates})")
    forget = report.forget_ids
    nb = find_neighbours(index, forget, spec.method.k, margin=spec.index.candidates_margin) if spec.method.needs_neighbours else None
    # The evaluation's default copy threshold derives from it: recorded, so it need not serve the index again.
    nearest = nb if nb is not None else find_neighbours(index, forget, 1, margin=spec.index.candidates_margin)
    remote = ctx.jobdir.remote
    (remote / "forget_ids.txt").write_text("\n".join(forget) + "\n")
    mapping = {} if nb is None else {fid: ids for fid, ids in zip(nb.forget_ids, nb.ids)}
    write_neighbours(remote / "neighbours.json", mapping)
    return {"forget_count": len(forget), "duplicates_added": report.count if spec.forget.duplicates == "add" else 0,
            "forget_ids_digest": ids_digest(forget), "duplicate_threshold": threshold,
            "nearest_retained_distance": float(nearest.distances[:, 0].min())}


def _default_duplicate_threshold(index) -> float:
    """Model-space L2 under which two items are copies: a tenth of the typical nearest-neighbour
    distance between distinct retained items (exact copies sit at 0), measured on the index's
    vectors (the space duplicates are searched in: pixels, or Stable Diffusion's VAE latents;
    pooled latents, whose distances are shorter, give a stricter threshold)."""
    rng = np.random.default_rng(0)
    rows = rng.choice(len(index), min(len(index), 512), replace=False)
    d2, _ = index.search(index.vectors(rows), 2)
    d = np.sqrt(np.maximum(d2, 0.0))
    positive = d[:, 1][d[:, 1] > 1e-6]
    return float(0.1 * np.median(positive)) if len(positive) else 1e-3
