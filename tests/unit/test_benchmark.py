"""The embedded benchmark plants one image at a few percent of the corpus, unambiguously."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from retrack.embedded.benchmark import BenchmarkPaths, ensure_benchmark, fashion_mnist_available, load_fashion_mnist_u8
from retrack.data.corpus import read_corpus, to_unit_range
from retrack.data.forget import read_forget_ids
from retrack.index.exact import exact_knn


@pytest.fixture(scope="module")
def scenario(bench, bench_info):
    """The digits scenario (the one CI has data for: it ships in scikit-learn)."""
    return bench.root, bench_info


def test_planted_copies_are_one_image_at_a_few_percent(scenario):
    root, info = scenario
    paths = BenchmarkPaths(root)
    corpus = read_corpus(paths.corpus)
    forget = read_forget_ids(paths.forget_ids)
    assert len(corpus) == info.corpus_size and len(forget) == info.forget_count
    assert 0.01 <= len(forget) / len(corpus) <= 0.05
    copies = corpus.images[corpus.index_of(forget)]
    assert np.all(copies == copies[0])
    # No retained item is a look-alike: all are farther than twice the frequency threshold.
    retained = np.delete(corpus.images, corpus.index_of(forget), axis=0)
    dist, _ = exact_knn(to_unit_range(copies[:1]), to_unit_range(retained), 1)
    assert dist[0, 0] >= 2 * info.forget_threshold * 0.999


def test_holdout_is_disjoint_from_the_corpus(scenario):
    root, info = scenario
    paths = BenchmarkPaths(root)
    corpus, holdout = read_corpus(paths.corpus), read_corpus(paths.holdout)
    assert len(holdout) == info.holdout_size > 100
    assert not set(holdout.ids) & set(corpus.ids)
    source_size = 1797  # scikit-learn's digits
    assert len(corpus) - info.forget_count + 1 + len(holdout) == source_size  # every source image used once (+ copies)


def test_existing_benchmark_is_reused_and_a_partial_one_rebuilt(scenario, tmp_path):
    root, info = scenario
    mtime = (BenchmarkPaths(root).info).stat().st_mtime_ns
    assert ensure_benchmark(root, info.name) == info
    assert BenchmarkPaths(root).info.stat().st_mtime_ns == mtime
    partial = BenchmarkPaths(tmp_path)
    ensure_benchmark(tmp_path)
    (partial.holdout / "_SUCCESS").unlink()
    assert not partial.complete()
    ensure_benchmark(tmp_path)
    assert partial.complete()


def write_idx(path, array: np.ndarray) -> None:
    """`array` (uint8) as an IDX file, the format Fashion-MNIST ships in."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_idx_files_are_read_as_shipped(tmp_path):
    """The Fashion-MNIST scenario's own code: finding and reading the Debian package's IDX files
    (the data itself is not in CI; the scenario builds like digits from the arrays read here)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30, dtype=np.uint8)
    assert not fashion_mnist_available(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    assert fashion_mnist_available(tmp_path)
    got_images, got_labels = load_fashion_mnist_u8(tmp_path, limit=20)
    np.testing.assert_array_equal(got_images, images[:20])
    np.testing.assert_array_equal(got_labels, labels[:20])
    assert got_labels.dtype == np.int64
