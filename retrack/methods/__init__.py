"""Unlearning methods, registered by name. Importing this package registers all of them."""

from retrack.methods.base import (
    DataRequirements,
    Denoiser,
    LossTerms,
    Method,
    MethodParams,
    UnlearnBatch,
    build_method,
    method_class,
    method_names,
    validate_params,
)
from retrack.methods import erasediff, retrack, simple, siss  # noqa: F401  (registration)

__all__ = [
    "DataRequirements",
    "Denoiser",
    "LossTerms",
    "Method",
    "MethodParams",
    "UnlearnBatch",
    "build_method",
    "method_class",
    "method_names",
    "validate_params",
]
