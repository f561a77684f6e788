"""Each forget item's K nearest retained items, as global retain indices: read from the index
stage's neighbours file (`retrack.data.neighbours`, the one format), or computed exactly in the
space the model denoises (small corpora)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from retrack.config.model_kind import ModelKind
from retrack.errors import InputError

if TYPE_CHECKING:
    from retrack.data.source import CorpusPlan
    from retrack.storage.location import Location


def read_neighbours_file(path: "Location", forget_ids: list[str], k: int, retain_index: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """[forget, K] retain indices of the neighbours file's entries; `retain_index(ids)` maps ids
    to retain indices (-1: not a retained corpus item)."""
    from retrack.data.neighbours import read_neighbours

    nb = read_neighbours(path, forget_ids, k)
    named = sorted({nid for fid in forget_ids for nid in nb[fid]})
    at = dict(zip(named, retain_index(named).tolist()))
    out = np.zeros((len(forget_ids), k), dtype=np.int64)
    for n, fid in enumerate(forget_ids):
        for j, nid in enumerate(nb[fid]):
            if at[nid] < 0:
                raise InputError(f"neighbours file {path}: forget entry {n + 1} names a neighbour that is not a retained corpus item")
            out[n, j] = at[nid]
    return out


def exact_neighbours(kind: ModelKind, model_dir: Path, corpus: "CorpusPlan", forget_rows: np.ndarray, retain_rows: np.ndarray, k: int,
                     geometry: tuple[int, int, int]) -> np.ndarray:
    """Exact K nearest retained items of every forget item, in the space the model denoises
    (the small-corpus path; large corpora pass the index stage's neighbours file)."""
    from retrack.data.corpus import read_corpus
    from retrack.index.exact import exact_knn

    if kind is ModelKind.PIXEL_DDPM:
        c = read_corpus(corpus, shape=geometry)
        _, idx = exact_knn(c.images[forget_rows], c.images[retain_rows], k)
        return idx.astype(np.int64)
    from retrack.data.corpus import decode_image, fit_image, iter_rows
    from retrack.models.latents import encode_latents, item_seed
    from retrack.models.sd import load_vae

    vae = load_vae(model_dir / "vae")
    latents = []
    chunk_imgs, chunk_seeds = [], []
    for row in iter_rows(corpus):
        chunk_imgs.append(fit_image(decode_image(row["image"], row["id"]), geometry))
        chunk_seeds.append(item_seed(row["id"]))
        if len(chunk_imgs) == 64:
            latents.append(encode_latents(vae, np.stack(chunk_imgs), chunk_seeds, geometry[0]))
            chunk_imgs, chunk_seeds = [], []
    if chunk_imgs:
        latents.append(encode_latents(vae, np.stack(chunk_imgs), chunk_seeds, geometry[0]))
    z = torch.cat(latents).numpy()
    _, idx = exact_knn(z[forget_rows], z[retain_rows], k)
    return idx.astype(np.int64)
