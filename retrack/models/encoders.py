"""Encoders of the index: images -> vectors in the space the model denoises.

- `pixels`: decoded images in model space (float32 in [-1, 1], CxHxW), flattened. The space of
  pixel DDPMs, so a neighbour found here is a neighbour for the unlearning method.
- `vae`: Stable Diffusion latents, flattened, by the rule of `retrack.models.latents` (resized to
  the model's resolution, sampled with the item's own seed, shifted and scaled): exactly the
  latents the model is trained and evaluated on.

An `EncoderSpec` is plain data (picklable, hashable into the manifest); `build_encoder(spec)` makes
the callable inside whatever process runs it (a Ray actor on a GPU, or the driver).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from retrack.data.corpus import to_model_space
from retrack.digest import config_digest, directory_digest
from retrack.errors import InputError


@dataclass(frozen=True)
class EncoderSpec:
    kind: str = "pixels"  # pixels | vae
    # vae: a Stable Diffusion pipeline folder or its `vae/` (the resolution is the UNet's), or a
    # bare AutoencoderKL folder with `resolution`; a local path or an s3:// URI (copied once per node)
    model_dir: str | None = None
    resolution: int | None = None
    device: str = "cpu"

    def vae_geometry(self) -> tuple[Path, int]:
        """The VAE folder and the side length items are resized to before encoding."""
        if not self.model_dir:
            raise InputError("the vae encoder needs model_dir (a Stable Diffusion pipeline folder)")
        from retrack.models.sd import pipeline_resolution
        from retrack.storage.cache import local_model_dir

        root = local_model_dir(self.model_dir)
        if _is_pipeline(root):
            vae_dir, resolution = root / "vae", pipeline_resolution(root)
        elif root.name == "vae" and _is_pipeline(root.parent):
            vae_dir, resolution = root, pipeline_resolution(root.parent)
        elif self.resolution is None:
            raise InputError(f"{root} is not a Stable Diffusion pipeline folder (nor its vae/): give the pipeline "
                             "folder, or the resolution the model's items are resized to")
        else:
            return root, self.resolution
        if self.resolution is not None and self.resolution != resolution:
            raise InputError(f"resolution {self.resolution} was given, but the model at {root} denoises {resolution}x{resolution}")
        return vae_dir, resolution

    def digest(self) -> str:
        """What decides the vectors: the kind, the VAE's weights and the resolution (not the device)."""
        body: dict = {"kind": self.kind}
        if self.kind == "vae":
            vae_dir, resolution = self.vae_geometry()
            body.update(rule="sd-latent/centre-crop", resolution=resolution, model=directory_digest(vae_dir))
        return config_digest(body)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_pipeline(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file() and (path / "vae").is_dir()


class Encoder(Protocol):
    spec: EncoderSpec

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """uint8 NxHxWxC -> float32 NxD."""


class PixelEncoder:
    def __init__(self, spec: EncoderSpec = EncoderSpec()):
        self.spec = spec

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str] = ()) -> np.ndarray:
        return np.ascontiguousarray(to_model_space(images_u8).reshape(len(images_u8), -1))


class VaeEncoder:
    def __init__(self, spec: EncoderSpec):
        import torch

        from retrack.models.sd import load_vae

        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            spec = replace(spec, device="cpu")  # same vectors, slower
        self.spec = spec
        vae_dir, self.resolution = spec.vae_geometry()
        self.vae = load_vae(vae_dir).to(spec.device)

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        from retrack.models.latents import encode_latents, item_seed

        if len(images_u8) == 0:
            return np.zeros((0, 0), np.float32)
        z = encode_latents(self.vae, images_u8, [item_seed(i) for i in ids], self.resolution)
        return z.reshape(len(z), -1).numpy()


def build_encoder(spec: EncoderSpec) -> Encoder:
    if spec.kind == "pixels":
        return PixelEncoder(spec)
    if spec.kind == "vae":
        return VaeEncoder(spec)
    raise InputError(f"unknown encoder {spec.kind!r}; known: pixels, vae")
