"""Fréchet distance between sample and reference sets in the features of the project's classifier.

torchmetrics' FrechetInceptionDistance accepts any nn.Module as its feature network. For a custom
module it feeds the images through unchanged (no resizing, no uint8 cast), probes the feature size
with a dummy image unless the module has `num_features`, and casts the result to the features'
dtype: the wrapper below declares `num_features` (no probe) and returns float64 features, so the
distance is not rounded to float32 at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from retrack.errors import InputError
from retrack.evaluation.metrics.classifier import FeatureClassifier


class UnitRangeFeatures(nn.Module):
    """[0, 1] float images -> float64 penultimate features of a classifier trained in [-1, 1]."""

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.feature_dim

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images01 * 2.0 - 1.0).double()


def _check(what: str, x: np.ndarray, shape: tuple[int, int, int]) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise InputError(f"{what} are {tuple(x.shape)}, the classifier expects Nx{shape[0]}x{shape[1]}x{shape[2]}")
    if len(x) < 2:
        raise InputError(f"the Fréchet distance needs at least 2 {what}, got {len(x)}")


def _metric(classifier: FeatureClassifier) -> tuple[FrechetInceptionDistance, tuple[int, int, int], torch.device]:
    shape = (classifier.config.channels, classifier.config.image_size, classifier.config.image_size)
    device = next(classifier.parameters()).device
    return FrechetInceptionDistance(feature=UnitRangeFeatures(classifier), normalize=True, input_img_size=shape).to(device), shape, device


def _update(metric: FrechetInceptionDistance, x: np.ndarray, real: bool, device: torch.device, batch_size: int) -> None:
    for start in range(0, len(x), batch_size):
        metric.update(torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device), real=real)


@dataclass
class ReferenceStats:
    """The reference side of the distance: the sum, outer-product sum and count of its features
    (torchmetrics' real-feature states), so a reference is featurised once and kept, not held."""

    total: torch.Tensor  # float64 (D,)
    cov_sum: torch.Tensor  # float64 (D, D)
    count: int

    @classmethod
    def of(cls, reference01: np.ndarray, classifier: FeatureClassifier, batch_size: int = 512) -> "ReferenceStats":
        metric, shape, device = _metric(classifier)
        _check("reference", reference01, shape)
        _update(metric, reference01, True, device, batch_size)
        return cls(metric.real_features_sum.cpu(), metric.real_features_cov_sum.cpu(), int(metric.real_features_num_samples))

    def save(self, path: str | Path) -> None:
        save_file({"total": self.total, "cov_sum": self.cov_sum, "count": torch.tensor([self.count])}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        t = load_file(str(path))
        return cls(t["total"], t["cov_sum"], int(t["count"][0]))


def frechet_distance(
    samples01: np.ndarray,
    reference: "np.ndarray | ReferenceStats",
    classifier: FeatureClassifier,
    batch_size: int = 512,
) -> float:
    """FID-style distance (lower = closer to the reference) between NxCxHxW samples in [0, 1] and
    a reference (images in [0, 1], or their `ReferenceStats`)."""
    stats = reference if isinstance(reference, ReferenceStats) else ReferenceStats.of(reference, classifier, batch_size)
    metric, shape, device = _metric(classifier)
    _check("samples", samples01, shape)
    metric.real_features_sum = stats.total.to(device)
    metric.real_features_cov_sum = stats.cov_sum.to(device)
    metric.real_features_num_samples = torch.tensor(stats.count, device=device)
    _update(metric, samples01, False, device, batch_size)
    return float(metric.compute())
