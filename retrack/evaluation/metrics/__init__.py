"""Evaluation metrics of the protocol (docs/method.md, "Evaluation protocol"), one module each."""

from retrack.evaluation.metrics.classifier import ClassifierConfig, FeatureClassifier, load_classifier, save_classifier, train_classifier
from retrack.evaluation.metrics.denoising_loss import denoising_loss, fixed_draws
from retrack.evaluation.metrics.forget_frequency import forget_frequency, nearest_forget_distance
from retrack.evaluation.metrics.frechet import ReferenceStats, UnitRangeFeatures, frechet_distance
from retrack.evaluation.metrics.integrity import feature_integrity, integrity, integrity_ratio
from retrack.evaluation.metrics.membership import membership_test

__all__ = [
    "ClassifierConfig",
    "FeatureClassifier",
    "ReferenceStats",
    "UnitRangeFeatures",
    "denoising_loss",
    "feature_integrity",
    "fixed_draws",
    "forget_frequency",
    "frechet_distance",
    "integrity",
    "integrity_ratio",
    "load_classifier",
    "membership_test",
    "nearest_forget_distance",
    "save_classifier",
    "train_classifier",
]
