"""The unlearn stage's Ray datasets: only the corpus rows the run needs (`pipelines.items`).

- 'retain_<rank>': the retained rows worker <rank>'s micro-batches draw over the whole run
  (`needed_retain_rows`; a large retained set is drawn from a pool as large as the draws), each
  tagged with its global retain index: every worker reads its own rows, none receives another's;
- 'forget': the forget items and their K neighbours (a small set), read by every worker.

So the draws are the single-process draws whatever the worker count. Both are materialised
before training starts, so no Ray Data task competes with the training workers for CPUs.
"""

from __future__ import annotations

import numpy as np
import ray
from ray.train import DataConfig

from pipelines.items import items_dataset
from retrack.training.plan import needed_retain_rows
from retrack.training.prepare import Prepared

# Nothing is split: a worker filters the rows it draws (streaming_split would also drop rows to even out shards).
DATA_CONFIG = DataConfig(datasets_to_split=[])


def retain_name(rank: int) -> str:
    return f"retain_{rank}"


def build_datasets(prep: Prepared) -> dict[str, ray.data.Dataset]:
    plan, train = prep.plan, prep.run.spec.train
    forget_wanted = {int(r): (-1, n) for n, r in enumerate(prep.forget_rows)}
    if plan.neighbours is not None:
        for r in np.unique(plan.neighbours):
            forget_wanted[int(prep.retain_rows[r])] = (int(r), -1)
    out = {"forget": items_dataset(prep.corpus, forget_wanted, plan.item_shape)}
    world = prep.run.spec.scaling.num_workers
    for rank in range(world):
        rows = needed_retain_rows(plan, train, world, rank)
        if len(rows):
            out[retain_name(rank)] = items_dataset(prep.corpus, {int(prep.retain_rows[r]): (int(r), -1) for r in rows}, plan.item_shape)
    return out
