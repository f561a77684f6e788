"""Corpus items for training: decoded at the model's geometry (in the data pipeline), then turned
into the tensors the model denoises: pixels on the worker; Stable Diffusion latents (by
`retrack.models.latents`, the one latent rule of index, training and evaluation) and caption
embeddings once per item, by the encoders that fill the item cache (`retrack.data.item_cache`)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from retrack.data.corpus import decode_image, fit_image, to_model_space
from retrack.errors import CorpusError

if TYPE_CHECKING:
    from retrack.data.source import CorpusPlan


def decode_items(batch: dict, tags: Sequence[tuple[int, int]], shape: tuple[int, int, int], images: bool = True) -> dict:
    """Corpus rows decoded to uint8 HxWxC at the model's geometry, each with its tag (row, pos):
    global retain index (or -1) and forget position (or -1). `images=False`: rows read without
    their image bytes, captions and labels alone (an all-zero image column of no size)."""
    from retrack.models.latents import item_seed

    ids = list(batch["id"])
    h, w, c = shape if images else (0, 0, 0)
    pixels = np.zeros((len(ids), h, w, c), dtype=np.uint8)
    for n in range(len(ids) if images else 0):
        pixels[n] = fit_image(decode_image(batch["image"][n], ids[n]), shape)
    captions, labels = batch.get("caption"), batch.get("label")
    tags = np.asarray(tags, dtype=np.int64).reshape(len(ids), 2)
    return {
        "id": np.array(ids, dtype=object),
        "row": tags[:, 0].copy(),
        "pos": tags[:, 1].copy(),
        "seed": np.array([item_seed(i) for i in ids], dtype=np.int64),
        "image": pixels,
        "caption": np.array([("" if captions is None or captions[n] is None else str(captions[n])) for n in range(len(ids))], dtype=object),
        "label": np.array([-1 if labels is None or labels[n] is None else int(labels[n]) for n in range(len(ids))], dtype=np.int64),
    }


def read_items(files: dict, source: "CorpusPlan", shape: tuple[int, int, int], images: bool = True) -> dict:
    """The rows of the corpus files `files["file"]` (numbers in `source.files`) at their
    `files["positions"]`, each tagged with its `files["tags"]` entry, decoded as `decode_items`
    does. A file that no longer holds those rows (rewritten under the job) is an error."""
    from retrack.data.source import iter_file_rows

    rows, tags = [], []
    for n, positions, file_tags in zip(files["file"], files["positions"], files["tags"]):
        f = source.files[int(n)]
        got = list(iter_file_rows(source, f, rows=np.asarray(positions, dtype=np.int64), images=images))
        if len(got) != len(positions):
            raise CorpusError(f"corpus file {f.rel} holds {len(got)} of the {len(positions)} rows the job listed: it changed under the job")
        rows += got
        tags += list(file_tags)
    batch = {k: [r[k] for r in rows] for k in ("id", "image", "caption", "label")}
    return decode_items(batch, tags, shape, images)


def no_items(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    return {
        "id": np.zeros(0, dtype=object),
        "row": np.zeros(0, np.int64),
        "pos": np.zeros(0, np.int64),
        "seed": np.zeros(0, np.int64),
        "image": np.zeros((0, *shape), np.uint8),
        "caption": np.zeros(0, dtype=object),
        "label": np.zeros(0, np.int64),
    }


def select(items: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in items.items()}


class PixelItems:
    """Pixel-DDPM items as a worker receives them (uint8 images) -> the tensors the model denoises."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape

    def empty(self) -> dict[str, np.ndarray]:
        return no_items(self.shape)

    def images(self, part: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(to_model_space(part["image"].astype(np.uint8)))

    def conds(self, part: dict[str, np.ndarray]) -> None:
        return None


class CachedItems:
    """Stable Diffusion items as the item cache delivers them (`retrack.data.item_cache`: fp16
    latents and caption embeddings, encoded once) -> float32 tensors."""

    def __init__(self, latent_shape: tuple[int, ...], cond_shape: tuple[int, ...]):
        self.latent_shape, self.cond_shape = tuple(latent_shape), tuple(cond_shape)

    def empty(self) -> dict[str, np.ndarray]:
        return {"id": np.zeros(0, dtype=object), "row": np.zeros(0, np.int64), "pos": np.zeros(0, np.int64),
                "latent": np.zeros((0, *self.latent_shape), np.float16), "cond": np.zeros((0, *self.cond_shape), np.float16)}

    def images(self, part: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(part["latent"].astype(np.float32))

    def conds(self, part: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(part["cond"].astype(np.float32))


@torch.no_grad()
def encode_sd_items(vae, text_encoder, tokenizer, part: dict[str, np.ndarray], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded items (uint8 images, captions, per-item seeds) -> their latents and caption
    embeddings in fp16, as the item cache keeps them. The VAE runs in fp32 whatever the device:
    the index encodes the same latents, and an item has one latent everywhere."""
    from retrack.models.latents import encode_latents

    latents = encode_latents(vae, part["image"].astype(np.uint8), [int(s) for s in part["seed"]], resolution)
    return latents.half().numpy(), encode_sd_captions(text_encoder, tokenizer, part["caption"])


@torch.no_grad()
def encode_sd_captions(text_encoder, tokenizer, captions: Sequence[str]) -> np.ndarray:
    """Captions -> their embeddings in fp16, as the item cache keeps them (bf16 autocast on a GPU)."""
    from retrack.models.clip import tokenize
    from retrack.models.sd import encode_captions

    device = next(text_encoder.parameters()).device
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
        return encode_captions(text_encoder, tokenize(tokenizer, list(captions))).half().numpy()
