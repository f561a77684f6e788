"""Validated settings shared by the CLI, the job spec and the Ray stages (pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrack.errors import InputError
from retrack.methods import DataRequirements, method_class, validate_params


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MethodConfig(StrictModel):
    """Which unlearning method to run and its hyperparameters."""

    name: str = Field("retrack", description="Registered method: retrack, vanilla, neggrad, erasediff or siss.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Method hyperparameters, e.g. {lambda: 0.005, k: 10} for retrack; validated by the method's own schema.",
    )

    @model_validator(mode="after")
    def _check(self) -> "MethodConfig":
        method_class(self.name)
        validate_params(self.name, self.params)
        return self

    @property
    def needs_neighbours(self) -> bool:
        return method_class(self.name).requirements.neighbours

    @property
    def k(self) -> int:
        return int(getattr(validate_params(self.name, self.params), "k", 0))

    def check_schedule(self, num_steps: int) -> None:
        """Refuse parameters the model's noise schedule cannot serve (e.g. retrack's t_min)."""
        method_class(self.name).check_schedule(validate_params(self.name, self.params), num_steps)


class TrainConfig(StrictModel):
    """Optimisation settings (the same budget is given to every method being compared)."""

    steps: int = Field(50, ge=1, description="Optimiser updates.")
    batch_size: int = Field(128, ge=1, description="Global batch per branch (forget and retain, unless forget_batch_size is set) per update.")
    forget_batch_size: int | None = Field(None, ge=1, description=(
        "Global forget-branch batch per update when it should differ from batch_size (None: batch_size, "
        "the paper's). A smaller forget batch frees compute for more updates of the retain branch: on the "
        "embedded benchmark 32 forget + 128 retain samples for 60 updates gave a lower Frechet distance "
        "than 128 + 128 for 40 (point estimates), at about the same compute (docs/experiments/embedded-benchmark.md, 'A forget batch of "
        "its own'). Methods that "
        "pair each retain sample with a forget sample (siss) refuse a different size."))
    grad_accum: int = Field(1, ge=1, description="GLOBAL micro-batches per update (micro-batch m runs on worker m % num_workers): a multiple of the worker count that divides batch_size.")
    lr: float = Field(5e-5, gt=0.0, description="Constant AdamW learning rate.")
    betas: tuple[float, float] = Field((0.95, 0.999), description="AdamW betas.")
    weight_decay: float = Field(1e-6, ge=0.0, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed of every random draw (t, eps, batches).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast dtype (bf16 on CPU or GPU, fp16 on GPU); weights stay fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on large UNets.")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N updates (0: only at the end).")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.forget_batch % self.grad_accum:
            raise ValueError(f"forget_batch_size {self.forget_batch} is not divisible by grad_accum {self.grad_accum}")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"AdamW betas must lie in [0, 1), got {self.betas}")
        return self

    def recorded(self) -> dict:
        """The fields that hashes and lineage record. Unset optional fields are left out, so adding
        one keeps the hashes (and the checkpoints and storage prefixes they name) of earlier runs."""
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def forget_batch(self) -> int:
        """The forget branch's global batch per update."""
        return self.forget_batch_size or self.batch_size

    def check_pairing(self, needs: DataRequirements) -> None:
        """Refuse a forget batch of its own size for a method that pairs retain and forget samples."""
        if needs.paired and self.forget_batch != self.batch_size:
            raise InputError(f"the method pairs every retain sample with a forget sample: forget_batch_size "
                             f"{self.forget_batch} must equal batch_size {self.batch_size} (or be left unset)")
