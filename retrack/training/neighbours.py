"""Each forget item's K nearest retained items, as global retain indices: read from the index
stage's neighbours file, or computed exactly in the space the model denoises (small corpora).
The file reader is to be replaced by `retrack.data.neighbours.read_neighbours` (one format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from retrack.config.model_kind import ModelKind
from retrack.errors import InputError


def read_neighbours_file(path: str, forget_ids: list[str], retain_pos: dict[str, int], k: int) -> np.ndarray:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"neighbours file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"neighbours file {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise InputError(f"neighbours file {path} must map each forget id to a list of retained ids")
    out = np.zeros((len(forget_ids), k), dtype=np.int64)
    for n, fid in enumerate(forget_ids):
        nbrs = raw.get(fid)
        if not isinstance(nbrs, list) or len(nbrs) < k:
            raise InputError(f"neighbours file {path}: forget entry {n + 1} has {0 if not isinstance(nbrs, list) else len(nbrs)} neighbours, k = {k} are needed")
        for j, nid in enumerate(nbrs[:k]):
            if nid not in retain_pos:
                raise InputError(f"neighbours file {path}: forget entry {n + 1} names a neighbour that is not a retained corpus item")
            out[n, j] = retain_pos[nid]
    return out


def exact_neighbours(kind: ModelKind, model_dir: Path, corpus_dir: Path, forget_rows: np.ndarray, retain_rows: np.ndarray, k: int, resolution: int) -> np.ndarray:
    """Exact K nearest retained items of every forget item, in the space the model denoises
    (the small-corpus path; large corpora pass the index stage's neighbours file)."""
    from retrack.data.corpus import read_corpus
    from retrack.index.exact import exact_knn

    if kind is ModelKind.PIXEL_DDPM:
        c = read_corpus(corpus_dir)
        _, idx = exact_knn(c.images[forget_rows], c.images[retain_rows], k)
        return idx.astype(np.int64)
    from diffusers import AutoencoderKL

    from retrack.data.corpus import decode_image, iter_rows
    from retrack.models.sd import encode_latents, item_seed, to_sd_pixels

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True).float().eval()
    latents = []
    chunk_imgs, chunk_seeds = [], []
    for row in iter_rows(corpus_dir):
        chunk_imgs.append(decode_image(row["image"], row["id"]))
        chunk_seeds.append(item_seed(row["id"]))
        if len(chunk_imgs) == 64:
            latents.append(encode_latents(vae, to_sd_pixels(np.stack(chunk_imgs), resolution), chunk_seeds))
            chunk_imgs, chunk_seeds = [], []
    if chunk_imgs:
        latents.append(encode_latents(vae, to_sd_pixels(np.stack(chunk_imgs), resolution), chunk_seeds))
    z = torch.cat(latents).numpy()
    _, idx = exact_knn(z[forget_rows], z[retain_rows], k)
    return idx.astype(np.int64)
