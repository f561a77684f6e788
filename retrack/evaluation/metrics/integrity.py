"""Model integrity (arXiv 2411.02068): how far unlearning moved what was NOT to be forgotten.

Deterministic (DDIM) sampling from the same seeds gives paired images from the original and the
unlearned model; their mean distance measures collateral damage that FID, a distribution-level
metric, misses. The paper uses LPIPS, whose VGG/AlexNet weights cannot be downloaded here, so
`integrity` is the pixel L2 variant and `feature_integrity` the perceptual one, in the features
of the project's own classifier. `exclude` drops pairs that were look-alikes of the forgotten
image in the original model: those are supposed to change. `integrity_ratio` puts the L2 on the
scale of the samples themselves, so one ceiling (the promotion gate's) fits pixels and latents at
any resolution.
"""

from __future__ import annotations

import numpy as np
import torch

from retrack.errors import InputError
from retrack.evaluation.metrics.classifier import FeatureClassifier


def _kept(samples_a01: np.ndarray, samples_b01: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """Boolean mask of the pairs to measure, after checking that the two sets are paired."""
    if samples_a01.shape != samples_b01.shape or samples_a01.ndim != 4:
        raise InputError(f"paired NxCxHxW sample sets are needed, got {samples_a01.shape} and {samples_b01.shape}")
    if exclude is None:
        keep = np.ones(len(samples_a01), dtype=bool)
    else:
        exclude = np.asarray(exclude)
        if exclude.dtype != bool or exclude.shape != (len(samples_a01),):
            raise InputError(f"exclude must be a boolean mask of {len(samples_a01)} samples, got {exclude.dtype} {exclude.shape}")
        keep = ~exclude
    if not keep.any():
        raise InputError("no sample pairs left to measure integrity on")
    return keep


def integrity(samples_a01: np.ndarray, samples_b01: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """Mean flattened L2 distance between paired samples in [0, 1] pixels (lower = less damage)."""
    keep = _kept(samples_a01, samples_b01, exclude)
    diff = (samples_a01[keep].astype(np.float64) - samples_b01[keep].astype(np.float64)).reshape(int(keep.sum()), -1)
    return float(np.linalg.norm(diff, axis=1).mean())


def integrity_ratio(samples_a01: np.ndarray, samples_b01: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """`integrity` over the mean L2 between unrelated samples of the first set (each measured
    sample against the next one): 0 = unchanged, about 1 = as different as two unrelated samples."""
    keep = _kept(samples_a01, samples_b01, exclude)
    if keep.sum() < 2:
        raise InputError("integrity_ratio needs at least 2 sample pairs to measure unrelated samples against")
    a = samples_a01[keep].astype(np.float64).reshape(int(keep.sum()), -1)
    unrelated = float(np.linalg.norm(a - np.roll(a, 1, axis=0), axis=1).mean())
    if unrelated == 0.0:
        raise InputError("the original's samples are all identical: integrity_ratio has no scale to measure against")
    return integrity(samples_a01, samples_b01, exclude) / unrelated


@torch.no_grad()
def feature_integrity(
    samples_a01: np.ndarray,
    samples_b01: np.ndarray,
    classifier: FeatureClassifier,
    exclude: np.ndarray | None = None,
    batch_size: int = 512,
) -> float:
    """Mean L2 distance between paired samples' classifier features (the perceptual variant)."""
    keep = _kept(samples_a01, samples_b01, exclude)
    a, b = samples_a01[keep], samples_b01[keep]
    device = next(classifier.parameters()).device
    dists = []
    for start in range(0, len(a), batch_size):
        pair = [
            classifier.features(torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device) * 2.0 - 1.0)
            for x in (a, b)
        ]
        dists.append((pair[0].double() - pair[1].double()).norm(dim=1).cpu())
    return float(torch.cat(dists).mean())
