"""The contract every unlearning method fulfils, and the registry that maps a name to a method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from retrack.models.schedule import NoiseSchedule
from retrack.errors import InputError
from retrack.methods.neighbour_sets import NeighbourSets

# A denoiser maps (x_t, t, conditioning or None) to the predicted noise eps_theta(x_t, t[, c]).
Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class DataRequirements:
    """Which inputs a method consumes, so the data stages only prepare (and ship) what is needed."""

    retain: bool
    forget: bool
    neighbours: bool
    # Each retain sample is used together with the forget sample at the same position (SISS's
    # mixture), so both batches must have the same size.
    paired: bool = False


@dataclass
class UnlearnBatch:
    """One micro-batch. Images are in the space the model denoises (pixels in [-1, 1] or latents).

    Set `neighbour_of[i]` of `neighbours` holds the K nearest retained items of `forget[i]` (without
    `neighbour_of`, set i does): forget items repeat within a batch, their neighbour sets are
    stored once. The drawer passes every forget item's set, prepared once per run
    (NeighbourSets), and `neighbour_of` the forget rows. `*_cond` is the text conditioning (encoder
    hidden states) of each item for conditional models, else None.
    """

    retain: torch.Tensor | None = None
    forget: torch.Tensor | None = None
    neighbours: torch.Tensor | NeighbourSets | None = None
    neighbour_of: torch.Tensor | None = None
    retain_cond: torch.Tensor | None = None
    forget_cond: torch.Tensor | None = None


@dataclass
class LossTerms:
    """Named differentiable losses whose gradients `Method.combine` merges, plus scalar logs."""

    losses: dict[str, torch.Tensor]
    logs: dict[str, float] = field(default_factory=dict)


class MethodParams(BaseModel):
    """Base of every method's hyperparameters; unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Method(ABC):
    """One unlearning objective. Subclasses set `name`, `requirements`, `Params` and `losses`."""

    name: ClassVar[str]
    requirements: ClassVar[DataRequirements]
    Params: ClassVar[type[MethodParams]]

    def __init__(self, schedule: NoiseSchedule, params: MethodParams):
        self.check_schedule(params, schedule.num_steps)
        self.schedule = schedule
        self.params = params

    @classmethod
    def check_schedule(cls, params: MethodParams, num_steps: int) -> None:
        """Refuse parameters that a schedule of `num_steps` timesteps cannot serve (InputError).
        Called at construction, and by the job's preflight with the model's scheduler config."""

    @abstractmethod
    def losses(self, denoise: Denoiser, batch: UnlearnBatch, generator: torch.Generator | None) -> LossTerms:
        """Draw t and eps for each branch independently and return the loss terms of this batch."""

    def combine(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Merge the (flattened, already averaged over workers) gradient of each named loss."""
        (only,) = grads.values()
        return only

    def check_batch(self, batch: UnlearnBatch) -> None:
        needs = self.requirements
        for wanted, value, what in (
            (needs.retain, batch.retain, "retain"),
            (needs.forget, batch.forget, "forget"),
            (needs.neighbours, batch.neighbours, "neighbours"),
        ):
            if wanted and value is None:
                raise InputError(f"method {self.name!r} needs a {what} batch, none was given")


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def validate_params(name: str, params: dict | MethodParams | None) -> MethodParams:
    """Validate a method's parameters; raises InputError naming the offending field."""
    cls = method_class(name)
    if isinstance(params, cls.Params):
        return params
    from pydantic import ValidationError

    from retrack.errors import describe_validation_error

    try:
        return cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise InputError(f"invalid parameters for method {name!r}: {describe_validation_error(exc)}") from None


def build_method(name: str, schedule: NoiseSchedule, params: dict | MethodParams | None = None) -> Method:
    return method_class(name)(schedule, validate_params(name, params))
