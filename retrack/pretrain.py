"""Pretraining of the pixel DDPMs the benchmark needs: the original (whole corpus) and the
gold standard (retained data only). Plain DDPM training with an EMA of the weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from retrack.diffusion import NoiseSchedule
from retrack.models import PixelDiffusion, default_scheduler, tiny_pixel_unet


@dataclass
class PretrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0


def pretrain(
    images: np.ndarray,
    config: PretrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[PixelDiffusion, float]:
    """Train a tiny UNet on `images` (NxCxHxW in [-1, 1]); returns the EMA model and wall seconds."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    data = torch.from_numpy(images)
    unet = tiny_pixel_unet(images.shape[-1], images.shape[1])
    scheduler = default_scheduler()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / config.warmup_steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    unet.train()
    for step in range(config.steps):
        rows = torch.randint(0, len(data), (config.batch_size,), generator=gen)
        x0 = data[rows]
        t = schedule.sample_t(len(x0), gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = (unet(schedule.add_noise(x0, t, eps), t).sample - eps).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if progress is not None:
            progress(step + 1, loss.item())
    ema.copy_to(unet.parameters())
    unet.eval()
    return PixelDiffusion(unet=unet, scheduler=scheduler), time.perf_counter() - start
