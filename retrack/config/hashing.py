"""The one config hash: a digest of everything that determines a result (never where it runs or
is stored). The job spec and the unlearn stage's run key hash different inputs with it."""

from __future__ import annotations

from typing import Any

from retrack.config.train import MethodConfig, TrainConfig
from retrack.digest import config_digest


def recipe_hash(method: MethodConfig, train: TrainConfig, **inputs: Any) -> str:
    """sha256 (hex) of the method, the training settings as recorded (unset optional fields left
    out, so adding one keeps earlier hashes) and the given JSON-able inputs."""
    return config_digest({**inputs, "method": method.model_dump(mode="json"), "train": train.recorded()})
