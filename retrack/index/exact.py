"""Exact nearest-neighbour search with faiss (the small-corpus path; the sharded index builds on it)."""

from __future__ import annotations

import numpy as np


def exact_knn(queries: np.ndarray, base: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest rows of `base` for every row of `queries`: (distances, indices), nearest first."""
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(threads)
    q = np.ascontiguousarray(queries.reshape(len(queries), -1), dtype=np.float32)
    b = np.ascontiguousarray(base.reshape(len(base), -1), dtype=np.float32)
    index = faiss.IndexFlatL2(b.shape[1])
    index.add(b)
    d2, idx = index.search(q, k)
    return np.sqrt(np.maximum(d2, 0.0)), idx
