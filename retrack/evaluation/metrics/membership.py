"""Per-example membership test: does the model still treat a forgotten item as training data?

A member's denoising loss is lower than a typical non-member's. Held-out items (never trained on)
give the non-member loss distribution; a forget item whose loss is below its alpha-quantile is
"still remembered" at level alpha: a non-member would fall that low only with probability about
alpha. Pure numpy so it runs anywhere the losses were saved.
"""

from __future__ import annotations

import math

import numpy as np

from retrack.errors import InputError


def _losses(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise InputError(f"{what} must be a non-empty 1-D array of finite losses, got shape {x.shape}")
    return x


def membership_test(forget_losses: np.ndarray, reference_losses: np.ndarray, alpha: float = 0.05) -> dict:
    """Return `percentiles` (per forget item, the fraction of reference losses <= its loss),
    `remembered` (boolean per item), `remembered_count`, `threshold` (the reference alpha-quantile),
    `alpha` and `n_reference`.

    The threshold is the smallest reference loss whose empirical CDF reaches alpha, so "loss <
    threshold" and "percentile < alpha" are the same decision. Fewer than 1/alpha references cannot
    resolve the alpha-quantile and are refused.
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    forget = _losses(forget_losses, "forget_losses")
    reference = np.sort(_losses(reference_losses, "reference_losses"))
    if len(reference) < math.ceil(1.0 / alpha):
        raise InputError(f"{len(reference)} reference losses cannot resolve the {alpha} quantile: at least {math.ceil(1.0 / alpha)} are needed")
    percentiles = np.searchsorted(reference, forget, side="right") / len(reference)
    threshold = float(np.quantile(reference, alpha, method="inverted_cdf"))
    remembered = forget < threshold
    return {
        "percentiles": percentiles,
        "remembered": remembered,
        "remembered_count": int(remembered.sum()),
        "threshold": threshold,
        "alpha": float(alpha),
        "n_reference": len(reference),
    }
