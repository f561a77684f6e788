"""How sure a benchmark's "X within 10% of the original's" is: a ratio of means with a bootstrap interval.

A metric of a fine-tuned model varies with the training seed and with the set of sampling seeds it
is scored on; the original's varies with the set alone. The Fréchet distance of 2,000 samples of the
digits model moves by about 10% between independent sets, so one set's ratio cannot decide a 10%
line. The ratio of the means over seeds x sets, with an interval that resamples both the sets
(shared by the model and the original: the samples are paired) and the seeds, can.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Ratio(NamedTuple):
    value: float
    low: float
    high: float  # the central `level` bootstrap interval

    def to_dict(self) -> dict:
        return {"ratio": self.value, "ci": [self.low, self.high]}


def ratio_of_means(model: np.ndarray, original: np.ndarray, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> Ratio:
    """mean(model) / mean(original) for `model` shaped (training seeds, sampling sets) and `original`
    shaped (sampling sets,), scored on the same sets; the interval resamples sets and seeds
    independently, with replacement, keeping each set's model and original scores together."""
    model, original = np.asarray(model, dtype=np.float64), np.asarray(original, dtype=np.float64)
    if model.ndim != 2 or original.ndim != 1 or model.shape[1] != len(original) or model.size == 0:
        raise ValueError(f"need model scores (seeds, sets) and original scores (sets,), got {model.shape} and {original.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if original.mean() <= 0:
        raise ValueError(f"the original's mean score must be positive to take a ratio, got {original.mean()}")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, model.shape[0], size=(resamples, model.shape[0]))
    sets = rng.integers(0, model.shape[1], size=(resamples, model.shape[1]))
    num = model[seeds[:, :, None], sets[:, None, :]].mean(axis=(1, 2))
    den = original[sets].mean(axis=1)
    # A resample of sets whose original mean is 0 has no ratio; it says the interval is unbounded.
    boot = np.divide(num, den, out=np.full(resamples, np.inf), where=den > 0)
    tail = (1.0 - level) / 2.0
    # The outer order statistics, never interpolated (an interpolation with inf would give nan).
    low, high = np.quantile(boot, tail, method="lower"), np.quantile(boot, 1.0 - tail, method="higher")
    return Ratio(float(model.mean() / original.mean()), float(low), float(high))
