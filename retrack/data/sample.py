"""Seeded samples of a corpus that cost what they hold: drawn as whole runs of consecutive rows
(items stored together: a parquet row group, neighbouring files), so fetching a sample of m rows
reads about m rows whatever the corpus size, where m rows drawn one by one from a large corpus
would touch nearly every row group."""

from __future__ import annotations

import numpy as np

BLOCK = 64  # rows per run; a corpus written in row groups of at most this many rows is fetched row for row


def block_sample(n: int, size: int, seed: int, block: int = BLOCK) -> np.ndarray:
    """About `size` of the positions 0..n-1 (all of them when size >= n), ascending: runs of
    `block` consecutive positions, the runs chosen uniformly with `seed`."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    runs = -(-n // block)
    chosen = np.sort(np.random.default_rng(seed).choice(runs, min(runs, -(-size // block)), replace=False))
    rows = (chosen[:, None] * block + np.arange(block)).ravel()
    return rows[rows < n].astype(np.int64)
