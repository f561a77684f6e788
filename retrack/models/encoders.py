"""Encoders: images -> vectors in the space the model denoises.

- `pixels`: decoded images in model space (float32 in [-1, 1], CxHxW), flattened. The space of
  pixel DDPMs, so a neighbour found here is a neighbour for the unlearning method.
- `vae`: Stable Diffusion latents, `vae.encode(x).latent_dist.sample() * scaling_factor` of a frozen
  diffusers `AutoencoderKL`, flattened. The sample's noise is drawn per item from a generator
  seeded by the item id, so an item's vector does not depend on the batch it fell into (the same
  distribution as `latent_dist.sample()`, reproducible across reruns and workers).

An `EncoderSpec` is plain data (picklable, hashable into the manifest); `build_encoder(spec)` makes
the callable inside whatever process runs it (a Ray actor on a GPU, or the driver).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import numpy as np

from retrack.data.corpus import to_model_space
from retrack.digest import config_digest, directory_digest
from retrack.errors import InputError, ModelLayoutError


@dataclass(frozen=True)
class EncoderSpec:
    kind: str = "pixels"  # pixels | vae
    model_dir: str | None = None  # vae: a diffusers AutoencoderKL folder (or a pipeline's `vae/`)
    device: str = "cpu"
    sample: str = "sample"  # vae: "sample" (latent_dist.sample, per-item seeded) or "mean"
    seed: int = 0
    batch_size: int = 256

    def digest(self) -> str:
        """What decides the vectors: the kind, the sampling and the model's weights (not the device)."""
        body = {"kind": self.kind}
        if self.kind == "vae":
            if not self.model_dir:
                raise InputError("the vae encoder needs model_dir (a diffusers AutoencoderKL folder)")
            body.update(sample=self.sample, seed=self.seed, model=directory_digest(self.model_dir))
        return config_digest(body)

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(Protocol):
    spec: EncoderSpec

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """uint8 NxHxWxC -> float32 NxD."""


class PixelEncoder:
    def __init__(self, spec: EncoderSpec = EncoderSpec()):
        self.spec = spec

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str] = ()) -> np.ndarray:
        return np.ascontiguousarray(to_model_space(images_u8).reshape(len(images_u8), -1))


def item_seed(seed: int, item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{item_id}".encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def vae_latents(vae, x, ids: Sequence[str] | None = None, seed: int = 0, sample: str = "sample"):
    """`vae.encode(x).latent_dist.sample() * scaling_factor` for a diffusers AutoencoderKL.

    `x`: float tensor NxCxHxW in [-1, 1] on the VAE's device. With `ids`, each item's noise comes
    from its own generator (seeded by `seed` and its id); without, from the global RNG.
    `sample="mean"` returns the latent mean instead (deterministic, no noise).
    """
    import torch

    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        if sample == "mean":
            z = dist.mean
        elif ids is None:
            z = dist.sample()
        else:
            eps = torch.stack(
                [torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(item_seed(seed, i))) for i in ids]
            ).to(device=dist.mean.device, dtype=dist.mean.dtype)
            z = dist.mean + dist.std * eps
        return z * vae.config.scaling_factor


class VaeEncoder:
    def __init__(self, spec: EncoderSpec):
        import torch
        from diffusers import AutoencoderKL

        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            spec = EncoderSpec(**{**spec.to_dict(), "device": "cpu"})  # same vectors, slower
        self.spec = spec
        try:
            self.vae = AutoencoderKL.from_pretrained(spec.model_dir).to(spec.device).eval().requires_grad_(False)
        except (OSError, ValueError) as exc:
            raise ModelLayoutError(f"{spec.model_dir} is not a diffusers AutoencoderKL folder: {exc}") from None
        self.torch = torch
        self.dtype = next(self.vae.parameters()).dtype

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        x = to_model_space(images_u8)
        want = self.vae.config.in_channels
        if x.shape[1] != want:
            if x.shape[1] == 1 and want == 3:
                x = np.repeat(x, 3, axis=1)
            else:
                raise InputError(f"the VAE takes {want} channel(s), the images have {x.shape[1]}")
        out = []
        bs = self.spec.batch_size
        for s in range(0, len(x), bs):
            xt = self.torch.from_numpy(x[s : s + bs]).to(self.spec.device, self.dtype)
            z = vae_latents(self.vae, xt, list(ids[s : s + bs]), self.spec.seed, self.spec.sample)
            out.append(z.float().reshape(len(z), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def build_encoder(spec: EncoderSpec) -> Encoder:
    if spec.kind == "pixels":
        return PixelEncoder(spec)
    if spec.kind == "vae":
        return VaeEncoder(spec)
    raise InputError(f"unknown encoder {spec.kind!r}; known: pixels, vae")
