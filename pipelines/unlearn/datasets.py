"""The unlearn stage's Ray datasets: Ray Data reads the corpus shards and keeps, decoded at the
model's geometry, only the rows the run needs.

- 'retain': every retained row the plan draws (at most steps x batch rows, however large the
  corpus), each tagged with its global retain index;
- 'forget': the forget items and their K neighbours (a small set).

Every worker receives both whole (nothing is split) and keeps what its own micro-batches draw,
so the draws are the single-process draws whatever the worker count. Both are materialised
before training starts, so no Ray Data task competes with the training workers for CPUs.
"""

from __future__ import annotations

import numpy as np
import ray
from ray.train import DataConfig

from pipelines.progress import ray_data_progress
from pipelines.runtime import unwrap
from retrack.training.items import decode_items
from retrack.training.plan import needed_retain_rows
from retrack.training.prepare import Prepared

# Nothing is split: a worker filters the rows it draws (streaming_split would also drop rows to even out shards).
DATA_CONFIG = DataConfig(datasets_to_split=[])


def build_datasets(prep: Prepared) -> dict[str, ray.data.Dataset]:
    plan, corpus = prep.plan, prep.corpus
    ray_data_progress(ray.data.DataContext.get_current())
    rows = needed_retain_rows(plan, prep.run.spec.train, world=1)
    retain_wanted = {corpus.ids[prep.retain_rows[r]]: (int(r), -1) for r in rows}
    forget_wanted = {corpus.ids[r]: (-1, n) for n, r in enumerate(prep.forget_rows)}
    if plan.neighbours is not None:
        for r in np.unique(plan.neighbours):
            forget_wanted[corpus.ids[prep.retain_rows[r]]] = (int(r), -1)
    out = {"forget": _items(prep, forget_wanted)}
    if retain_wanted:
        out["retain"] = _items(prep, retain_wanted)
    return out


def _items(prep: Prepared, wanted: dict[str, tuple[int, int]]) -> ray.data.Dataset:
    """The wanted items, decoded; a retrack error in a read task surfaces as itself."""
    cols = ["id", "image"] + (["caption"] if prep.corpus.has_captions else [])
    ds = ray.data.read_parquet([str(p) for p in prep.corpus.shards]).select_columns(cols)
    ds.context.raise_original_map_exception = True  # so a bad row's CorpusError arrives as the cause
    try:
        return ds.map_batches(
            decode_items, batch_format="numpy", fn_kwargs={"wanted": wanted, "kind": prep.plan.kind, "shape": prep.plan.item_shape}
        ).materialize()
    except Exception as exc:  # a Ray task error: surface retrack's own error, not a traceback
        cause = unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise
