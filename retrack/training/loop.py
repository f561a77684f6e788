"""Single-process unlearning: assemble the method's data, draw deterministic micro-batches, train.

Randomness is keyed by (seed, step, micro-batch), never by worker: the distributed trainer hands
micro-batch m of a step to worker m % W and gets the same update as one process running them all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch

from retrack.config.train import MethodConfig, TrainConfig
from retrack.data.corpus import Corpus
from retrack.data.forget import check_forget_ids, positions_in
from retrack.data.sample import BLOCK, block_sample
from retrack.models.schedule import NoiseSchedule
from retrack.errors import InputError
from retrack.index.exact import exact_knn
from retrack.methods import DataRequirements, Method, UnlearnBatch, build_method
from retrack.methods.neighbour_sets import NeighbourSets
from retrack.models.pixel import PixelDiffusion
from retrack.training.step import make_optimizer, unlearning_step


@dataclass
class UnlearnData:
    """Everything a method may consume, in the space the model denoises."""

    retain: torch.Tensor  # [N_r, C, H, W]
    forget: torch.Tensor  # [N_u, C, H, W]
    neighbours: torch.Tensor | None = None  # [N_u, K, C, H, W]
    retain_cond: torch.Tensor | None = None
    forget_cond: torch.Tensor | None = None


def check_k(k: int, retain_size: int) -> None:
    if k > retain_size:
        raise InputError(f"method.params.k = {k} is larger than the retained set ({retain_size} items)")


def split_for_unlearning(corpus: Corpus, forget_ids: Sequence[str], method: MethodConfig) -> UnlearnData:
    """Check the forget ids, split the corpus and look up each forget item's K nearest retained items."""
    forget_rows = check_forget_ids(forget_ids, lambda ids: positions_in(corpus.ids, ids))
    retain_rows = np.setdiff1d(np.arange(len(corpus)), forget_rows)
    if len(retain_rows) == 0:
        raise InputError("the forget set covers the whole corpus: nothing is left to retain")
    retain = torch.from_numpy(corpus.images[retain_rows])
    forget = torch.from_numpy(corpus.images[forget_rows])
    neighbours = None
    if method.needs_neighbours:
        check_k(method.k, len(retain_rows))
        _, idx = exact_knn(corpus.images[forget_rows], corpus.images[retain_rows], method.k)
        neighbours = retain[torch.from_numpy(idx)]
    return UnlearnData(retain=retain, forget=forget, neighbours=neighbours)


MIN_RETAIN_POOL = 4096  # so a short run still draws from many items, not a few
POOL_RUNS = 16  # at most this many runs of consecutive rows: every corpus file a run touches costs a read of its footer


def retain_pool(n_retain: int, train: TrainConfig) -> np.ndarray | None:
    """The retain indices a run draws from: all (None) when the retained set is no larger than
    the run's draws (steps x batch, at least MIN_RETAIN_POOL), otherwise a seeded block sample of
    that size in at most POOL_RUNS runs. A run then fetches about as many retained rows, from
    about as many files, however large the corpus; each draw is uniform over the pool."""
    size = max(train.steps * train.batch_size, MIN_RETAIN_POOL)
    return None if size >= n_retain else block_sample(n_retain, size, train.seed, block=max(BLOCK, -(-size // POOL_RUNS)))


def micro_generator(seed: int, step: int, micro: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, micro]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class BatchDrawer:
    """Draws step `s`'s global batch from (seed, s) and serves it as `grad_accum` micro-batches on
    `device` (the data stays where it is; each micro-batch is copied over)."""

    def __init__(self, data: UnlearnData, needs: DataRequirements, train: TrainConfig, device: torch.device = torch.device("cpu")):
        train.check_pairing(needs)
        self.data, self.needs, self.train, self.device = data, needs, train, device
        self.micro_size = train.batch_size // train.grad_accum
        self.forget_micro_size = train.forget_batch // train.grad_accum
        self.pool = retain_pool(len(data.retain), train)

    @cached_property
    def neighbour_sets(self) -> NeighbourSets | None:
        # None when the data has none: the method's check_batch then names what is missing.
        return None if self.data.neighbours is None else NeighbourSets.of(self.data.neighbours).to(self.device)

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.train.seed, step])
        f = rng.integers(0, len(self.data.forget), self.train.forget_batch)
        if self.pool is None:
            return f, rng.integers(0, len(self.data.retain), self.train.batch_size)
        return f, self.pool[rng.integers(0, len(self.pool), self.train.batch_size)]

    def microbatch(self, step: int, micro: int) -> tuple[UnlearnBatch, torch.Generator]:
        f_rows, r_rows = self.rows(step)
        fs, rs = self.forget_micro_size, self.micro_size
        f, r = torch.from_numpy(f_rows[micro * fs : (micro + 1) * fs]), torch.from_numpy(r_rows[micro * rs : (micro + 1) * rs])
        d, needs = self.data, self.needs
        dev = self.device
        pick = lambda x, rows: None if x is None else x[rows].to(dev)  # noqa: E731
        batch = UnlearnBatch(
            retain=pick(d.retain, r) if needs.retain else None,
            forget=pick(d.forget, f) if needs.forget else None,
            neighbours=self.neighbour_sets if needs.neighbours else None,
            neighbour_of=f.to(dev) if needs.neighbours and self.neighbour_sets is not None else None,
            retain_cond=pick(d.retain_cond, r) if needs.retain else None,
            forget_cond=pick(d.forget_cond, f) if needs.forget else None,
        )
        gen = micro_generator(self.train.seed, step, micro)
        # Same seed on the device: the draws are the device's own, made where the noise is used.
        return batch, gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(gen.initial_seed())


def pixel_denoiser(unet):
    return lambda x, t, cond=None: unet(x, t).sample


def run_unlearning(
    model: PixelDiffusion,
    data: UnlearnData,
    method_cfg: MethodConfig,
    train: TrainConfig,
    progress: Callable[[int, dict], None] | None = None,
) -> tuple[list[dict], float]:
    """Unlearn in place; returns the per-step logs and wall seconds."""
    device = next(model.unet.parameters()).device
    method: Method = build_method(method_cfg.name, NoiseSchedule.from_scheduler(model.scheduler, device), method_cfg.params)
    drawer = BatchDrawer(data, method.requirements, train, device)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, train.lr, train.betas, train.weight_decay)
    denoise = pixel_denoiser(model.unet)
    model.unet.train()
    history = []
    start = time.perf_counter()
    for step in range(train.steps):
        pairs = [drawer.microbatch(step, m) for m in range(train.grad_accum)]
        logs = unlearning_step(method, params, opt, denoise, [b for b, _ in pairs], [g for _, g in pairs], step=step)
        history.append({"step": step + 1, **logs})
        if progress is not None:
            progress(step + 1, logs)
    model.unet.eval()
    return history, time.perf_counter() - start
