"""The unlearn stage's Ray datasets: only the corpus rows the run needs (`pipelines.items`; for
Stable Diffusion encoded once, through the item cache: `pipelines.encoded_items`).

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

from pipelines.encoded_items import encoded_items, subset
from pipelines.items import items_dataset
from retrack.config.model_kind import ModelKind
from retrack.index.manifest import Manifest
from retrack.storage.location import Location
from retrack.training.plan import needed_retain_rows
from retrack.training.prepare import Prepared, item_cache

# Nothing is split: a worker filters the rows it draws (streaming_split would also drop rows to even out shards).
DATA_CONFIG = DataConfig(datasets_to_split=[])


def retain_name(rank: int) -> str:
    return f"retain_{rank}"


def build_datasets(prep: Prepared, index: tuple[Location, Manifest] | None) -> tuple[dict[str, ray.data.Dataset], dict[str, int] | None]:
    """The datasets (`index`: the run's index of its items' latents, from `latent_index`), and for
    Stable Diffusion how many of their items the item cache held, how many took their latents from
    the index (their captions encoded now) and how many were encoded now."""
    plan, train = prep.plan, prep.run.spec.train
    forget_wanted = {int(r): (-1, n) for n, r in enumerate(prep.forget_rows)}
    neighbour_rows = np.unique(plan.neighbours) if plan.neighbours is not None else np.zeros(0, np.int64)
    for r in neighbour_rows:
        forget_wanted[int(prep.retain_rows[r])] = (int(r), -1)
    world = prep.run.spec.scaling.num_workers
    ranks = {rank: rows for rank in range(world) if len(rows := needed_retain_rows(plan, train, world, rank))}
    if plan.kind is ModelKind.PIXEL_DDPM:
        out = {"forget": items_dataset(prep.corpus, forget_wanted, plan.item_shape)}
        for rank, rows in ranks.items():
            out[retain_name(rank)] = items_dataset(prep.corpus, {int(prep.retain_rows[r]): (int(r), -1) for r in rows}, plan.item_shape)
        return out, None
    # Every item the run uses, encoded (or read from the cache) once; each dataset its share.
    wanted = dict(forget_wanted)
    for rows in ranks.values():
        wanted.update({int(prep.retain_rows[r]): (int(r), -1) for r in rows})
    spec = prep.run.spec
    items = encoded_items(prep.corpus, wanted, item_cache(prep), spec.model.uri, prep.model_s3, spec.scaling.encode_batch_size, index)
    out = {"forget": subset(items.dataset, neighbour_rows, forget=True)}
    out.update({retain_name(rank): subset(items.dataset, rows) for rank, rows in ranks.items()})
    return out, {"cached": items.cached, "from_index": items.from_index, "encoded": items.encoded}
