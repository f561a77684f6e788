"""Corpus items fetched by row: Ray Data tasks read, from storage by URI, only the files that hold
the wanted rows, and of those files only the wanted rows (a parquet shard's row groups that hold
them), decoded at the model's geometry. The unlearn stage trains on them; the evaluation scores
against them. What is fetched grows with the rows asked for, never with the corpus."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import ray

from pipelines.progress import ray_data_progress
from pipelines.runtime import unwrap
from retrack.storage.location import Location
from retrack.training.items import no_items, read_items
from retrack.training.prepare import CorpusIndex


def _read_items(files: dict, source, **kwargs) -> dict:
    return read_items(files, ray.get(source), **kwargs)


def items_dataset(corpus: CorpusIndex, wanted_rows: dict[int, tuple[int, int]], shape: tuple[int, int, int], images: bool = True) -> ray.data.Dataset:
    """The wanted corpus rows (row -> the (row, pos) tags each item carries), read by one task per
    file that holds some (`images=False`: their ids, captions and labels, no image bytes fetched);
    a retrack error in a read task surfaces as itself. Materialised, so that no read competes
    later with the work that uses them."""
    ray_data_progress(ray.data.DataContext.get_current())
    groups = corpus.by_file(sorted(wanted_rows))
    tasks = [{"file": j, "positions": local.tolist(), "tags": [wanted_rows[int(corpus.starts[n] + p)] for p in local]}
             for j, (n, local) in enumerate(groups)]
    # The tasks get a listing of just the files they read (never the corpus's whole file list),
    # with S3 credentials resolved here (workers may have started before the AWS_* variables were
    # set), inside an object reference (never in a task's arguments).
    root = corpus.source.root
    needed = [corpus.source.files[n] for n, _ in groups]
    source = ray.put(replace(corpus.source, root=Location(root.uri, root.s3.resolved()), files=needed, chunks=[]))
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    return materialized(ds.map_batches(_read_items, batch_size=1, batch_format="numpy", fn_kwargs={
        "source": source, "shape": shape, "images": images,
    }))


def materialized(ds: ray.data.Dataset) -> ray.data.Dataset:
    """`ds.materialize()`; a retrack error in one of its tasks (a bad row's CorpusError, a storage
    error) surfaces as itself, not as Ray's traceback."""
    ds.context.raise_original_map_exception = True
    try:
        return ds.materialize()
    except Exception as exc:
        cause = unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise


def fetch_items(corpus: CorpusIndex, rows: Sequence[int], shape: tuple[int, int, int], images: bool = True) -> dict[str, np.ndarray]:
    """The items at the given corpus rows (distinct), in that order, on the caller: for a bounded
    number of rows (the forgotten items, their neighbours, an evaluation sample)."""
    rows = [int(r) for r in rows]
    if not rows:
        return no_items(shape if images else (0, 0, 0))
    parts = list(items_dataset(corpus, {r: (r, -1) for r in rows}, shape, images).iter_batches(batch_size=None, batch_format="numpy"))
    got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else no_items(shape if images else (0, 0, 0))
    by_row = np.argsort(got["row"])
    order = by_row[np.clip(np.searchsorted(got["row"][by_row], rows), 0, max(len(by_row) - 1, 0))]
    if len(by_row) == 0 or not np.array_equal(got["row"][order], rows):
        raise RuntimeError(f"fetched {len(got['row'])} of {len(rows)} corpus rows")  # a listing that changed under the job
    return {k: v[order] for k, v in got.items()}
