"""The benchmark's ratio-to-the-original with its bootstrap interval (retrack/evaluation/stats.py)."""

import numpy as np
import pytest

from retrack.evaluation.stats import ratio_of_means


def test_ratio_is_the_ratio_of_means_and_its_interval_holds_it():
    model = np.array([[11.0, 13.0, 9.0], [12.0, 15.0, 10.0]])
    original = np.array([10.0, 12.0, 8.0])
    r = ratio_of_means(model, original)
    assert r.value == pytest.approx(model.mean() / original.mean())
    assert r.low <= r.value <= r.high
    assert r.low < r.high


def test_without_noise_the_interval_is_the_point():
    r = ratio_of_means(np.full((4, 5), 11.0), np.full(5, 10.0))
    assert r.low == pytest.approx(1.1) and r.high == pytest.approx(1.1)


def test_pairing_removes_the_sets_shared_noise():
    """Sets that are hard for the original are hard for the model too: resampling a set moves both,
    so the ratio's interval is far narrower than either mean's spread would suggest."""
    rng = np.random.default_rng(1)
    set_noise = rng.normal(0, 1.0, size=6)
    original = 10.0 + set_noise
    model = 11.0 + set_noise + rng.normal(0, 0.05, size=(8, 6))
    paired = ratio_of_means(model, original)
    unpaired = ratio_of_means(model, original[::-1])  # the same numbers, sets no longer matched
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)
    assert paired.low < 1.1 < paired.high


def test_more_sets_narrow_the_interval():
    rng = np.random.default_rng(2)

    def width(sets):
        original = 10.0 + rng.normal(0, 1.0, size=sets)
        model = 1.1 * original[None, :] + rng.normal(0, 1.0, size=(8, sets))
        r = ratio_of_means(model, original)
        return r.high - r.low

    assert np.median([width(24) for _ in range(5)]) < np.median([width(3) for _ in range(5)])


@pytest.mark.parametrize(
    "model, original, match",
    [
        (np.ones(3), np.ones(3), "seeds, sets"),
        (np.ones((2, 3)), np.ones(4), "seeds, sets"),
        (np.ones((0, 3)), np.ones(3), "seeds, sets"),
        (np.ones((2, 3)), np.zeros(3), "must be positive"),
    ],
)
def test_bad_shapes_and_a_zero_baseline_are_refused(model, original, match):
    with pytest.raises(ValueError, match=match):
        ratio_of_means(model, original)


def test_a_level_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="level"):
        ratio_of_means(np.ones((2, 3)), np.ones(3), level=1.0)
