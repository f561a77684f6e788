"""Noising branches shared by the methods: each branch draws its own t and eps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrack.models.schedule import NoiseSchedule, randn_like, sum_sq
from retrack.methods.base import Denoiser


@dataclass
class Noised:
    x0: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    xt: torch.Tensor


def noise(schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator | None, t_min: int = 0) -> Noised:
    t = schedule.sample_t(x0.shape[0], generator, low=t_min)
    eps = randn_like(x0, generator)
    return Noised(x0=x0, t=t, eps=eps, xt=schedule.add_noise(x0, t, eps))


def denoise_together(
    denoise: Denoiser, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
) -> list[torch.Tensor]:
    """Run several branches through the model in one forward pass (cheaper than one pass each)."""
    conds = [c for _, _, c in parts]
    if all(c is None for c in conds):
        cond = None
    elif all(c is not None for c in conds):
        cond = torch.cat(conds)
    else:
        return [denoise(x, t, c) for x, t, c in parts]
    out = denoise(torch.cat([x for x, _, _ in parts]), torch.cat([t for _, t, _ in parts]), cond)
    return list(out.split([x.shape[0] for x, _, _ in parts]))


def vanilla_loss(pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """E ||eps_theta - eps||^2, summed over elements, averaged over the batch."""
    return sum_sq(pred - eps).mean()
