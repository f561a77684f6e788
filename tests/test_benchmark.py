"""The embedded benchmark plants one image at a few percent of the corpus, unambiguously."""

from __future__ import annotations

import numpy as np
import pytest

from retrack.embedded.benchmark import BenchmarkPaths, ensure_benchmark, fashion_mnist_available
from retrack.data.corpus import read_corpus, to_unit_range
from retrack.data.forget import read_forget_ids
from retrack.index.exact import exact_knn

SCENARIOS = [
    "digits",
    pytest.param("fashion-mnist", marks=pytest.mark.skipif(not fashion_mnist_available(), reason="Debian package dataset-fashion-mnist not installed")),
]


@pytest.fixture(scope="module", params=SCENARIOS)
def bench(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    info = ensure_benchmark(root, request.param)
    return root, info


def test_planted_copies_are_one_image_at_a_few_percent(bench):
    root, info = bench
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


def test_holdout_is_disjoint_from_the_corpus(bench):
    root, info = bench
    paths = BenchmarkPaths(root)
    corpus, holdout = read_corpus(paths.corpus), read_corpus(paths.holdout)
    assert len(holdout) == info.holdout_size > 100
    assert not set(holdout.ids) & set(corpus.ids)
    source_size = {"digits": 1797, "fashion-mnist": 10_000}[info.name]
    assert len(corpus) - info.forget_count + 1 + len(holdout) == source_size  # every source image used once (+ copies)


def test_existing_benchmark_is_reused_and_a_partial_one_rebuilt(bench, tmp_path):
    root, info = bench
    mtime = (BenchmarkPaths(root).info).stat().st_mtime_ns
    assert ensure_benchmark(root, info.name) == info
    assert BenchmarkPaths(root).info.stat().st_mtime_ns == mtime
    partial = BenchmarkPaths(tmp_path)
    ensure_benchmark(tmp_path)
    (partial.holdout / "_SUCCESS").unlink()
    assert not partial.complete()
    ensure_benchmark(tmp_path)
    assert partial.complete()
