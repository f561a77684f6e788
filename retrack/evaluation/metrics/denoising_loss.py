"""Denoising loss over fixed (t, eps) draws: a cheap ELBO proxy for how well a model knows an item.

The paper measures the forgotten image's likelihood (bits/dim via the probability-flow ODE); the
per-item mean of the sum-reduced squared noise-prediction error over a fixed set of timesteps and
noises is the ELBO's Monte-Carlo estimate up to weighting, at a fraction of the cost. The draws
depend only on the seed and the image shape, never on the item, the batch or the model, so losses
are comparable across items and between the original and the unlearned model (paired, which
removes most of the Monte-Carlo noise from their difference). Higher = more forgotten.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import SchedulerMixin
from torch import nn

from retrack.models.schedule import NoiseSchedule, sum_sq
from retrack.errors import InputError


def fixed_draws(num_timesteps: int, n_draws: int, image_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, eps) drawn on the CPU from `seed`, so they are identical whatever device the model is on."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randint(0, num_timesteps, (n_draws,), generator=gen)
    eps = torch.randn((n_draws, *image_shape), generator=gen)
    return t, eps


@torch.no_grad()
def denoising_loss(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    images_m11: np.ndarray | torch.Tensor,
    n_draws: int = 64,
    seed: int = 0,
    batch_size: int = 256,
    cond: torch.Tensor | None = None,
) -> np.ndarray:
    """Per item, mean over the fixed draws of ||eps_theta(x_t, t[, c]) - eps||^2 (float64, shape N).

    `images_m11` are in the space the UNet denoises (pixels in [-1, 1] or latents). `cond[i]` is
    item i's encoder hidden states for a UNet2DConditionModel; without it the UNet is called
    unconditionally (UNet2DModel). `batch_size` counts (item, draw) pairs per forward pass and does
    not change the result.
    """
    x0 = torch.as_tensor(images_m11, dtype=torch.float32)
    if x0.ndim != 4:
        raise InputError(f"images must be NxCxHxW, got shape {tuple(x0.shape)}")
    if cond is not None and len(cond) != len(x0):
        raise InputError(f"cond has {len(cond)} entries for {len(x0)} images: one per item is needed")
    if n_draws < 1:
        raise InputError(f"n_draws must be positive, got {n_draws}")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    schedule = NoiseSchedule.from_scheduler(scheduler, device)
    t_all, eps_all = fixed_draws(schedule.num_steps, n_draws, tuple(x0.shape[1:]), seed)
    t_all, eps_all = t_all.to(device), eps_all.to(device)
    n = len(x0)
    losses = torch.empty(n * n_draws, dtype=torch.float64)
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, n * n_draws, batch_size):
            pairs = torch.arange(start, min(start + batch_size, n * n_draws))
            items, draws = pairs // n_draws, (pairs % n_draws).to(device)
            t, eps = t_all[draws], eps_all[draws]
            x_t = schedule.add_noise(x0[items].to(device), t, eps).to(dtype)
            if cond is None:
                pred = unet(x_t, t).sample
            else:
                pred = unet(x_t, t, encoder_hidden_states=cond[items].to(device=device, dtype=dtype)).sample
            losses[start : start + len(pairs)] = sum_sq(pred.float() - eps).double().cpu()
    finally:
        unet.train(was_training)
    return losses.view(n, n_draws).mean(dim=1).numpy()
