"""The unlearn stage's Ray datasets: Ray Data tasks read, from storage by URI, only the corpus
files that hold the rows the run needs, and keep those rows decoded at the model's geometry.

- 'retain': every retained row the plan draws (at most steps x batch rows, however large the
  corpus), each tagged with its global retain index;
- 'forget': the forget items and their K neighbours (a small set).

Every worker receives both whole (nothing is split) and keeps what its own micro-batches draw,
so the draws are the single-process draws whatever the worker count. Both are materialised
before training starts, so no Ray Data task competes with the training workers for CPUs.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import ray
from ray.train import DataConfig

from pipelines.progress import ray_data_progress
from pipelines.runtime import unwrap
from retrack.storage.location import Location
from retrack.training.items import read_items
from retrack.training.plan import needed_retain_rows
from retrack.training.prepare import Prepared

# Nothing is split: a worker filters the rows it draws (streaming_split would also drop rows to even out shards).
DATA_CONFIG = DataConfig(datasets_to_split=[])


def build_datasets(prep: Prepared) -> dict[str, ray.data.Dataset]:
    plan = prep.plan
    ray_data_progress(ray.data.DataContext.get_current())
    rows = needed_retain_rows(plan, prep.run.spec.train, world=1)
    retain_wanted = {int(prep.retain_rows[r]): (int(r), -1) for r in rows}
    forget_wanted = {int(r): (-1, n) for n, r in enumerate(prep.forget_rows)}
    if plan.neighbours is not None:
        for r in np.unique(plan.neighbours):
            forget_wanted[int(prep.retain_rows[r])] = (int(r), -1)
    out = {"forget": _items(prep, forget_wanted)}
    if retain_wanted:
        out["retain"] = _items(prep, retain_wanted)
    return out


def _read_items(files: dict, source, **kwargs) -> dict:
    return read_items(files, ray.get(source), **kwargs)


def _items(prep: Prepared, wanted_rows: dict[int, tuple[int, int]]) -> ray.data.Dataset:
    """The wanted corpus rows (row -> (retain index, forget position)), read by the tasks from the
    files that hold them; a retrack error in a read task surfaces as itself."""
    corpus = prep.corpus
    wanted = {corpus.ids[r]: v for r, v in wanted_rows.items()}
    files = [asdict(corpus.source.files[n]) for n in corpus.files_of(sorted(wanted_rows))]
    # The listing reaches the tasks without its file list (each row names its own file), with S3
    # credentials resolved here (workers may have started before the AWS_* variables were set),
    # inside an object reference (never in a task's arguments).
    root = corpus.source.root
    source = ray.put(replace(corpus.source, root=Location(root.uri, root.s3.resolved()), files=[], chunks=[]))
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    ds.context.raise_original_map_exception = True  # so a bad row's CorpusError arrives as the cause
    try:
        return ds.map_batches(_read_items, batch_size=1, batch_format="numpy", fn_kwargs={
            "source": source, "wanted": wanted, "kind": prep.plan.kind, "shape": prep.plan.item_shape,
        }).materialize()
    except Exception as exc:  # a Ray task error: surface retrack's own error, not a traceback
        cause = unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise
