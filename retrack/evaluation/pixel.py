"""Scoring an unlearned pixel DDPM: forgetting, quality and integrity against the original.

The reference data are the retained items with every look-alike of a forgotten image removed,
as the protocol asks; integrity compares same-seed samples on what was NOT to be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from retrack.data.corpus import Corpus, to_unit_range
from retrack.evaluation.metrics import (
    FeatureClassifier,
    ReferenceStats,
    denoising_loss,
    feature_integrity,
    frechet_distance,
    integrity,
    integrity_ratio,
    membership_test,
    nearest_forget_distance,
)
from retrack.models.pixel import PixelDiffusion
from retrack.evaluation.sampling import generate

METRIC_KEYS = ("forget_frequency", "frechet_distance", "integrity", "integrity_ratio", "feature_integrity", "forget_loss")


@dataclass
class EvalReference:
    forget_m11: np.ndarray  # distinct forget images, model space
    threshold: float  # L2 in [0, 1] pixels under which a sample is a copy of a forgotten image
    reference: ReferenceStats  # features of the retained data without look-alikes
    holdout_m11: np.ndarray | None  # non-members, for the per-item membership test
    classifier: FeatureClassifier

    @property
    def forget01(self) -> np.ndarray:
        return to_unit_range(self.forget_m11)


def reference_of(
    forget_m11: np.ndarray,
    retained_m11: np.ndarray,
    threshold: float,
    classifier: FeatureClassifier,
    holdout_m11: np.ndarray | None = None,
) -> EvalReference:
    """The reference from the forget items and the retained items (all, or a sample of them):
    retained look-alikes of a forgotten image are left out of the quality reference."""
    forget = np.unique(forget_m11, axis=0)
    lookalike = nearest_forget_distance(to_unit_range(retained_m11), to_unit_range(forget)) < threshold
    return EvalReference(
        forget_m11=forget,
        threshold=threshold,
        reference=ReferenceStats.of(to_unit_range(retained_m11[~lookalike]), classifier),
        holdout_m11=holdout_m11,
        classifier=classifier,
    )


def build_reference(
    corpus: Corpus,
    forget_ids: list[str],
    threshold: float,
    classifier: FeatureClassifier,
    holdout: Corpus | None = None,
) -> EvalReference:
    """The reference of an in-memory corpus (the embedded benchmark): its whole retained set."""
    forget_rows = corpus.index_of(forget_ids)
    return reference_of(corpus.images[forget_rows], np.delete(corpus.images, forget_rows, axis=0), threshold, classifier,
                        None if holdout is None else holdout.images)


def score(
    model: PixelDiffusion,
    samples01: np.ndarray,
    ref: EvalReference,
    original_samples01: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of `model` from its samples; with the original's same-seed samples, integrity too."""
    dist = nearest_forget_distance(samples01, ref.forget01)
    metrics = {
        "forget_frequency": float(np.mean(dist < ref.threshold)),
        "frechet_distance": frechet_distance(samples01, ref.reference, ref.classifier),
        "forget_loss": float(denoising_loss(model.unet, model.scheduler, ref.forget_m11).mean()),
        "num_samples": float(len(samples01)),
    }
    if original_samples01 is not None:
        # Integrity on what was not to be forgotten: drop seeds where the original drew a copy.
        copies = nearest_forget_distance(original_samples01, ref.forget01) < ref.threshold
        metrics["integrity"] = integrity(original_samples01, samples01, exclude=copies)
        metrics["integrity_ratio"] = integrity_ratio(original_samples01, samples01, exclude=copies)
        metrics["feature_integrity"] = feature_integrity(original_samples01, samples01, ref.classifier, exclude=copies)
    return metrics


def evaluate_model(
    model: PixelDiffusion,
    ref: EvalReference,
    n_samples: int,
    seed: int = 0,
    original_samples01: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Sample `model` in this process (same seeds as the original's, so integrity is paired) and
    score it; `progress(samples done, n_samples)` while sampling."""
    samples = generate(model, n_samples, seed=seed, progress=progress)
    return score(model, samples, ref, original_samples01), samples


def membership(model: PixelDiffusion, ref: EvalReference, alpha: float = 0.05) -> dict:
    """Per-item test: is each forgotten item's denoising loss still below the non-members' range?"""
    if ref.holdout_m11 is None:
        raise ValueError("membership needs held-out non-member items")
    forget = denoising_loss(model.unet, model.scheduler, ref.forget_m11)
    held = denoising_loss(model.unet, model.scheduler, ref.holdout_m11)
    return membership_test(forget, held, alpha=alpha)
