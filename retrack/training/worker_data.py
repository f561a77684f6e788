"""The data one worker of a distributed run holds: all forget items and their neighbours, and of
the retained items just the rows its own micro-batches draw, as an `UnlearnData` the unchanged
`BatchDrawer` draws from by global retain index."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from retrack.training.items import CachedItems, PixelItems, select
from retrack.training.loop import UnlearnData
from retrack.training.plan import DataPlan, Sized, SparseRows


def keep_rows(batches: Iterable[dict[str, np.ndarray]], empty: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The items of `batches` (all, or those whose retain row is in `rows`), concatenated
    (`empty`: the columns of no items)."""
    parts: dict[str, list] = {k: [v] for k, v in empty.items()}
    for batch in batches:
        if rows is not None:
            batch = select(batch, np.isin(batch["row"], rows))
        for k in parts:
            parts[k].append(batch[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def assemble(plan: DataPlan, encoder: PixelItems | CachedItems, forget_batches: Iterable[dict], retain_batches: Iterable[dict], mine: np.ndarray) -> UnlearnData:
    """`forget_batches`: the forget dataset (forget items by position, neighbours by retain row);
    `retain_batches`: the retained rows of the whole run, of which the worker keeps `mine`."""
    forget_part = keep_rows(forget_batches, encoder.empty())
    f_idx = np.where(forget_part["pos"] >= 0)[0]
    f_idx = f_idx[np.argsort(forget_part["pos"][f_idx])]
    if len(f_idx) != plan.n_forget:
        raise RuntimeError(f"a worker received {len(f_idx)} forget items, expected {plan.n_forget}")
    fsel = select(forget_part, f_idx)
    forget = encoder.images(fsel)
    forget_cond = encoder.conds(fsel)
    neighbours = None
    if plan.neighbours is not None:
        nsel = select(forget_part, np.where(forget_part["row"] >= 0)[0])
        bank = SparseRows(plan.n_retain, nsel["row"], encoder.images(nsel))
        flat = bank[torch.from_numpy(np.array(plan.neighbours).reshape(-1))]
        neighbours = flat.view(plan.n_forget, plan.neighbours.shape[1], *flat.shape[1:])
    retain = Sized(plan.n_retain)
    retain_cond = None
    if plan.needs.retain:
        held = keep_rows(retain_batches, encoder.empty(), mine)
        if not np.array_equal(np.sort(held["row"]), mine):
            raise RuntimeError(f"a worker holds {len(held['row'])} of its {len(mine)} retained rows")
        retain = SparseRows(plan.n_retain, held["row"], encoder.images(held))
        cond = encoder.conds(held)
        retain_cond = None if cond is None else SparseRows(plan.n_retain, held["row"], cond)
    return UnlearnData(retain=retain, forget=forget, neighbours=neighbours, retain_cond=retain_cond, forget_cond=forget_cond)  # type: ignore[arg-type]
