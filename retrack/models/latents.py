"""The one rule for an item's Stable Diffusion latent, used by the index, training and evaluation,
so an item has the same latent wherever it is searched, trained on or scored:

1. bring the image to the model's resolution in RGB (`retrack.data.corpus.fit_image`, the
   one rule every item and query goes through) and map it to [-1, 1];
2. sample the frozen VAE's posterior with the item's own generator, seeded from the item's id
   (diffusers' per-sample generators: `latent_dist.sample(generator=[...])`), so the latent never
   depends on the batch or the worker the item fell into;
3. `(z - shift_factor) * scaling_factor`, as diffusers' Stable Diffusion training scripts do
   (shift_factor is unset, i.e. 0, for SD 1.x/2.x VAEs).

The pixel space has its own single encoder, `retrack.data.corpus.to_model_space`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

CHUNK = 16  # images per VAE forward pass


def item_seed(item_id: str) -> int:
    """A 63-bit seed derived from an item's id: the seed of the item's latent sample."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") >> 1


def sd_pixels(images_u8: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 NxHxWxC (grey or RGB) -> float32 Nx3xRxR in [-1, 1] (`fit_image` each)."""
    from retrack.data.corpus import fit_image

    arr = np.stack([fit_image(img, (resolution, resolution, 3)) for img in images_u8]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images_u8: np.ndarray, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """Latents [N, C, R/f, R/f] (float32, CPU) of uint8 images, item n sampled with `seeds[n]`
    (`item_seed` of its id)."""
    if len(seeds) != len(images_u8):
        raise ValueError(f"{len(images_u8)} images but {len(seeds)} seeds")
    param = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, len(images_u8), CHUNK):
        x = sd_pixels(images_u8[start : start + CHUNK], resolution).to(device=param.device, dtype=param.dtype)
        # CPU generators: the noise is drawn on the CPU, so it is the same whatever the device.
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + CHUNK]]
        z = vae.encode(x).latent_dist.sample(generator=generators)
        out.append(((z - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out) if out else torch.zeros((0,))
