"""Encoders of the index: images -> vectors in the space the model denoises.

- `pixels`: decoded images in model space (float32 in [-1, 1], CxHxW), flattened. The space of
  pixel DDPMs, so a neighbour found here is a neighbour for the unlearning method.
- `vae`: Stable Diffusion latents, by the rule of `retrack.models.latents` (brought to the model's
  resolution, sampled with the item's own seed, shifted and scaled): exactly the latents the model
  is trained and evaluated on. With `pool` > 1 (opt-in) the index holds each channel's
  pool x pool blocks summed and divided by pool, an orthogonal projection onto the latent's coarse
  structure, and the full latents apart (`embedding_table`). A pooled distance never exceeds the
  full one, so a radius search for near-duplicates on them misses none; neighbours are searched on
  them and re-ranked on the full latents (`retrack.index.search`), with a loss of recall that
  docs/scaling.md measures.

An `EncoderSpec` is plain data (picklable, hashable into the manifest); `build_encoder(spec)` makes
the callable inside whatever process runs it (a Ray actor on a GPU, or the driver).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from retrack.data.corpus import to_model_space
from retrack.digest import config_digest, directory_digest
from retrack.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class EncoderSpec:
    kind: str = "pixels"  # pixels | vae
    # vae: a Stable Diffusion pipeline folder or its `vae/` (the resolution is the UNet's), or a
    # bare AutoencoderKL folder with `resolution`; a local path or an s3:// URI (copied once per node)
    model_dir: str | None = None
    resolution: int | None = None
    device: str = "cpu"
    # vae: side of the latent blocks pooled into the indexed vector (1: latents indexed whole)
    pool: int = 1

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

    def _latents(self) -> tuple[int, int]:
        """(channels, side) of the VAE's latents at the model's resolution."""
        vae_dir, resolution = self.vae_geometry()
        config = json.loads((vae_dir / "config.json").read_text())
        return config["latent_channels"], resolution // 2 ** (len(config["block_out_channels"]) - 1)

    def latent_pool(self) -> int:
        """The pool side, checked against the VAE's latents (1 for pixels: indexed whole)."""
        if self.kind != "vae" or self.pool == 1:
            return 1
        side = self._latents()[1]
        if self.pool < 1 or side % self.pool:
            raise InputError(f"the latent pool {self.pool} does not divide the latent side {side}")
        return self.pool

    def vector_dim(self, image_shape: tuple[int, int, int]) -> int:
        """Length of the indexed vectors, known before anything is encoded (`image_shape`: the
        corpus items' geometry, which the pixel encoder keeps)."""
        if self.kind != "vae":
            return int(np.prod(image_shape))
        channels, side = self._latents()
        return channels * (side // self.latent_pool()) ** 2

    def digest(self) -> str:
        """What decides the vectors: the kind, the VAE's weights, the resolution and the pool (not
        the device)."""
        body: dict = {"kind": self.kind}
        if self.kind == "vae":
            vae_dir, resolution = self.vae_geometry()
            body.update(rule="sd-latent/centre-crop", resolution=resolution, model=directory_digest(vae_dir))
            if (pool := self.latent_pool()) > 1:  # full-latent indexes keep the digest they had
                body["pool"] = pool
        return config_digest(body)

    def to_dict(self) -> dict:
        return asdict(self)


def pool_latents(z: np.ndarray, pool: int) -> np.ndarray:
    """N x C x H x W latents -> N x (C * H/pool * W/pool): each block's sum divided by pool (its
    coordinate on the block's unit vector), so distances shrink or stay, never grow."""
    n, c, h, w = z.shape
    return np.ascontiguousarray(z.reshape(n, c, h // pool, pool, w // pool, pool).sum(axis=(3, 5)).reshape(n, -1) / pool)


def _is_pipeline(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file() and (path / "vae").is_dir()


class Encoder(Protocol):
    spec: EncoderSpec
    pool: int  # > 1: the indexed vectors are pooled latents, and the full ones are kept apart

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """uint8 NxHxWxC -> float32 NxD: the indexed vectors."""

    def indexed_and_full(self, images_u8: np.ndarray, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The indexed vectors and the full ones (the same for an encoder that indexes them whole)."""


class PixelEncoder:
    pool = 1

    def __init__(self, spec: EncoderSpec = EncoderSpec()):
        self.spec = spec

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str] = ()) -> np.ndarray:
        return np.ascontiguousarray(to_model_space(images_u8).reshape(len(images_u8), -1))

    def indexed_and_full(self, images_u8: np.ndarray, ids: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        v = self(images_u8, ids)
        return v, v


class VaeEncoder:
    def __init__(self, spec: EncoderSpec):
        import torch

        from retrack.models.sd import load_vae

        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            spec = replace(spec, device="cpu")  # same vectors, slower
        self.spec = spec
        vae_dir, self.resolution = spec.vae_geometry()
        self.vae = load_vae(vae_dir).to(spec.device)
        self.pool = spec.latent_pool()

    def latents(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        from retrack.models.latents import encode_latents, item_seed

        return encode_latents(self.vae, images_u8, [item_seed(i) for i in ids], self.resolution).numpy()

    def __call__(self, images_u8: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        return self.indexed_and_full(images_u8, ids)[0]

    def indexed_and_full(self, images_u8: np.ndarray, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The latents pooled by `pool` (whole when it is 1) and whole, flattened."""
        if len(images_u8) == 0:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        z = self.latents(images_u8, ids)
        full = np.ascontiguousarray(z.reshape(len(z), -1))
        return (pool_latents(z, self.pool) if self.pool > 1 else full), full


def embedding_table(encoder: Encoder, ids: Sequence[str], images_u8: np.ndarray) -> "pa.Table":
    """An embedding batch: the indexed vectors and, where they are pooled latents, the full
    latents in fp16 (what neighbours are re-ranked on; the index stores them apart)."""
    from retrack.data.source import vectors_table

    if encoder.pool > 1:
        vectors, latents = encoder.indexed_and_full(images_u8, ids)
        return vectors_table(ids, vectors, latents)
    return vectors_table(ids, encoder(images_u8, ids))


def build_encoder(spec: EncoderSpec) -> Encoder:
    if spec.kind == "pixels":
        return PixelEncoder(spec)
    if spec.kind == "vae":
        return VaeEncoder(spec)
    raise InputError(f"unknown encoder {spec.kind!r}; known: pixels, vae")
