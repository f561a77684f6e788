"""Sampling with diffusers' DDIM pipeline: deterministic, so the same seed gives comparable images."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import DDIMPipeline

from retrack.models.pixel import PixelDiffusion

DEFAULT_SAMPLING_STEPS = 50


@torch.no_grad()
def generate(
    model: PixelDiffusion,
    n: int,
    seed: int = 0,
    batch_size: int = 500,
    num_inference_steps: int = DEFAULT_SAMPLING_STEPS,
    first_batch: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """n images, float32 NxCxHxW in [0, 1]. Batch b draws its noise from seed `seed + b`, so any
    subset of batches (e.g. one per Ray task) reproduces exactly the images of a single run.
    `progress(done, n)` after each batch."""
    pipe = DDIMPipeline(unet=model.unet, scheduler=model.sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    device = next(model.unet.parameters()).device
    out = []
    for b, start in enumerate(range(0, n, batch_size), start=first_batch):
        gen = torch.Generator(device="cpu").manual_seed(seed + b)
        m = min(batch_size, n - start)
        images = pipe(batch_size=m, generator=gen, eta=0.0, num_inference_steps=num_inference_steps, output_type="np").images
        out.append(np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2))
        if progress is not None:
            progress(start + m, n)
    del device
    return np.concatenate(out) if out else np.zeros((0, *model.image_shape), np.float32)
