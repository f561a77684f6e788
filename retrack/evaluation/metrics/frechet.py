"""Fréchet distance between sample and reference sets in the features of the project's classifier.

torchmetrics' FrechetInceptionDistance accepts any nn.Module as its feature network. For a custom
module it feeds the images through unchanged (no resizing, no uint8 cast), probes the feature size
with a dummy image unless the module has `num_features`, and casts the result to the features'
dtype: the wrapper below declares `num_features` (no probe) and returns float64 features, so the
distance is not rounded to float32 at the end.
"""

from __future__ import annotations

import numpy as np
import torch
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


def frechet_distance(
    samples01: np.ndarray,
    reference01: np.ndarray,
    classifier: FeatureClassifier,
    batch_size: int = 512,
) -> float:
    """FID-style distance (lower = closer to the reference) between two NxCxHxW sets in [0, 1]."""
    shape = (classifier.config.channels, classifier.config.image_size, classifier.config.image_size)
    for what, x in (("samples", samples01), ("reference", reference01)):
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise InputError(f"{what} are {tuple(x.shape)}, the classifier expects Nx{shape[0]}x{shape[1]}x{shape[2]}")
        if len(x) < 2:
            raise InputError(f"the Fréchet distance needs at least 2 {what}, got {len(x)}")
    device = next(classifier.parameters()).device
    metric = FrechetInceptionDistance(feature=UnitRangeFeatures(classifier), normalize=True, input_img_size=shape).to(device)
    for x, real in ((reference01, True), (samples01, False)):
        for start in range(0, len(x), batch_size):
            metric.update(torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device), real=real)
    return float(metric.compute())
