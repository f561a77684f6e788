"""Corpus items for training: decoded at the model's geometry (in the data pipeline), then turned
into the tensors the model denoises (on the worker); Stable Diffusion items follow
`retrack.models.latents`, the one latent rule of index, training and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from retrack.config.model_kind import ModelKind
from retrack.data.corpus import decode_image, fit_image, to_model_space

if TYPE_CHECKING:
    from retrack.data.source import CorpusPlan


def decode_items(batch: dict, wanted: dict[str, tuple[int, int]], shape: tuple[int, int, int], images: bool = True) -> dict:
    """Keep the wanted ids of a corpus batch, decoded to uint8 HxWxC at the model's geometry.
    `wanted[id] = (row, pos)`: global retain index (or -1) and forget position (or -1).
    `images=False` keeps the captions and labels alone (an all-zero image column of no size)."""
    from retrack.models.latents import item_seed

    keep = [n for n, i in enumerate(batch["id"]) if i in wanted]
    h, w, c = shape if images else (0, 0, 0)
    pixels = np.zeros((len(keep), h, w, c), dtype=np.uint8)
    for j, n in enumerate(keep if images else ()):
        pixels[j] = fit_image(decode_image(batch["image"][n], batch["id"][n]), shape)
    captions, labels = batch.get("caption"), batch.get("label")
    ids = [batch["id"][n] for n in keep]
    return {
        "row": np.array([wanted[i][0] for i in ids], dtype=np.int64),
        "pos": np.array([wanted[i][1] for i in ids], dtype=np.int64),
        "seed": np.array([item_seed(i) for i in ids], dtype=np.int64),
        "image": pixels,
        "caption": np.array([("" if captions is None or captions[n] is None else str(captions[n])) for n in keep], dtype=object),
        "label": np.array([-1 if labels is None or labels[n] is None else int(labels[n]) for n in keep], dtype=np.int64),
    }


def read_items(files: dict, source: "CorpusPlan", wanted: dict[str, tuple[int, int]], shape: tuple[int, int, int],
               images: bool = True) -> dict:
    """The wanted rows of the corpus files `files["file"]` (numbers in `source.files`), of each only
    those at its `files["positions"]`, decoded as `decode_items` does."""
    from retrack.data.source import iter_file_rows

    rows = []
    for n, positions in zip(files["file"], files["positions"]):
        f = source.files[int(n)]
        rows += [r for r in iter_file_rows(source, f, rows=np.asarray(positions, dtype=np.int64)) if r["id"] in wanted]
    batch = {k: [r[k] for r in rows] for k in ("id", "image", "caption", "label")}
    return decode_items(batch, wanted, shape, images)


def no_items(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    return {
        "row": np.zeros(0, np.int64),
        "pos": np.zeros(0, np.int64),
        "seed": np.zeros(0, np.int64),
        "image": np.zeros((0, *shape), np.uint8),
        "caption": np.zeros(0, dtype=object),
        "label": np.zeros(0, np.int64),
    }


def select(items: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in items.items()}


class ItemEncoder:
    """Items (uint8 images, captions, per-item seeds) -> tensors in the space the model denoises."""

    def __init__(self, kind: ModelKind, bundle):
        self.kind, self.bundle = kind, bundle

    def images(self, part: dict[str, np.ndarray]) -> torch.Tensor:
        if self.kind is ModelKind.PIXEL_DDPM:
            return torch.from_numpy(to_model_space(part["image"].astype(np.uint8)))
        from retrack.models.latents import encode_latents

        m = self.bundle
        return encode_latents(m.vae, part["image"].astype(np.uint8), [int(s) for s in part["seed"]], m.resolution)

    def conds(self, part: dict[str, np.ndarray]) -> torch.Tensor | None:
        if self.kind is ModelKind.PIXEL_DDPM:
            return None
        from retrack.models.clip import tokenize
        from retrack.models.sd import encode_captions

        return encode_captions(self.bundle.text_encoder, tokenize(self.bundle.tokenizer, list(part["caption"])))
