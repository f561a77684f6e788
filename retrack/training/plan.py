"""The data plan of a distributed unlearning run: integers only (never ids or images).

`BatchDrawer` keys every draw by (seed, step, micro-batch), so the retained rows a run will ever
touch follow from the sizes alone, and micro-batch m of a step belongs to worker m % W. A worker
holds just the rows its own micro-batches draw, in `SparseRows`, indexed by the GLOBAL retain
index: the drawer picks from it exactly as from the whole retained set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrack.config.model_kind import ModelKind
from retrack.config.train import TrainConfig
from retrack.methods import DataRequirements
from retrack.training.loop import BatchDrawer, UnlearnData


@dataclass
class DataPlan:
    """Everything the workers need to know about the data."""

    kind: ModelKind
    n_retain: int
    n_forget: int
    needs: DataRequirements
    neighbours: np.ndarray | None  # [n_forget, K] global retain indices
    item_shape: tuple[int, int, int]  # uint8 H, W, C every item is decoded to
    has_captions: bool
    corpus_fingerprint: str
    forget_digest: str
    neighbours_digest: str | None


class Sized:
    """A stand-in with only a length: the retained set of a worker that draws none, and the data
    of a drawer that only plans rows."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class SparseRows:
    """Rows of a conceptually [n, ...] tensor of which only some are held, indexed by global row.
    `BatchDrawer` sees the full length and picks by global index exactly as on the full tensor."""

    def __init__(self, n: int, rows: np.ndarray, values: torch.Tensor):
        order = np.argsort(rows, kind="stable")
        self.n = n
        self.rows = np.asarray(rows, dtype=np.int64)[order]
        self.values = values[torch.from_numpy(order)] if len(order) else values
        if len(np.unique(self.rows)) != len(self.rows):
            raise ValueError("SparseRows: duplicate rows")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> torch.Tensor:
        wanted = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        pos = np.searchsorted(self.rows, wanted)
        pos_ok = np.clip(pos, 0, max(len(self.rows) - 1, 0))
        if len(self.rows) == 0 or not np.array_equal(self.rows[pos_ok], wanted):
            missing = sorted(set(wanted.tolist()) - set(self.rows.tolist()))[:5]
            raise KeyError(f"rows {missing} are not held by this worker (data plan and drawer disagree)")
        return self.values[torch.from_numpy(pos_ok)]


def micro_batches_of(rank: int, world: int, grad_accum: int) -> list[int]:
    """The global micro-batch indices a worker runs: m % world == rank."""
    return [m for m in range(grad_accum) if m % world == rank]


def needed_retain_rows(plan: DataPlan, train: TrainConfig, world: int, rank: int | None = None, start_step: int = 0) -> np.ndarray:
    """Global retain rows drawn by one worker (or all workers when rank is None) from start_step on."""
    if not plan.needs.retain:
        return np.zeros(0, dtype=np.int64)
    drawer = BatchDrawer(UnlearnData(retain=Sized(plan.n_retain), forget=Sized(plan.n_forget)), plan.needs, train)  # type: ignore[arg-type]
    size = drawer.micro_size
    micro = range(train.grad_accum) if rank is None else micro_batches_of(rank, world, train.grad_accum)
    parts = []
    for step in range(start_step, train.steps):
        _, r_rows = drawer.rows(step)
        parts.extend(r_rows[m * size : (m + 1) * size] for m in micro)
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
