"""Small corpora for the index tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrack.data.corpus import encode_image, write_shards


def clustered_images(n: int, size: int = 8, clusters: int = 24, noise: float = 14.0, seed: int = 0) -> np.ndarray:
    """uint8 n x size x size images around `clusters` random centres (a structure IVF can exploit)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(40, 215, size=(clusters, size, size))
    which = rng.integers(0, clusters, n)
    return np.clip(centres[which] + rng.normal(0, noise, size=(n, size, size)), 0, 255).astype(np.uint8)


def write_corpus(out: Path, images: np.ndarray, ids: list[str] | None = None, shard_size: int = 256) -> list[str]:
    ids = ids or [f"item-{n:06d}" for n in range(len(images))]
    write_shards(out, ({"id": i, "image": encode_image(img), "label": 0} for i, img in zip(ids, images)), shard_size)
    return ids


def recall_at(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The embedded benchmark: (info, paths, corpus, forget ids). Import it into a test module to use it."""
    from retrack.embedded.benchmark import BenchmarkPaths, ensure_benchmark
    from retrack.data.corpus import read_corpus
    from retrack.data.forget import read_forget_ids

    root = tmp_path_factory.mktemp("bench")
    info = ensure_benchmark(root)
    paths = BenchmarkPaths(root)
    return info, paths, read_corpus(paths.corpus), read_forget_ids(paths.forget_ids)
