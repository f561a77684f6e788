"""Tuning an unlearning method's hyperparameters: the search space of the job spec, the Pareto
front of the trials and the rule that picks one (no Ray here; `pipelines/tune/` runs the trials).

Two objectives, both minimised: forgetting (the forget frequency) and quality damage (the Fréchet
distance to the retained data). A configuration is acceptable when it forgets as well as the job
spec's evaluation verdict demands; among the acceptable ones the least damaging wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import product
from typing import Any, Literal

from pydantic import Field, model_validator

from retrack.config.train import MethodConfig, StrictModel, TrainConfig
from retrack.errors import InputError
from retrack.methods import method_class, validate_params

OBJECTIVES = ("forget_frequency", "frechet_distance")
TRAIN_KEYS = {"lr": float, "steps": int}
HEALTH_METRIC = "retain_loss_ratio"


class RetainLossRatio:
    """The one health scalar the trainer reports while tuning: the retain-branch denoising loss,
    smoothed, over its lowest value in the first updates. It stays near 1 while the model keeps
    what it should; a collapsing model (lambda or lr too large) drives it up, a NaN makes it NaN.
    The baseline is a minimum, not a mean: a model wrecked by its very first update must not
    raise its own baseline and hide the collapse."""

    def __init__(self, smoothing: float = 0.8, warmup: int = 3):
        self.smoothing, self.warmup = smoothing, warmup
        self.first: list[float] = []
        self.ema: float | None = None

    def update(self, logs: dict[str, float]) -> float | None:
        loss = logs.get("loss_retain")
        if loss is None:  # a method without a retain branch (NegGrad) reports no health
            return None
        self.ema = loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * loss
        if len(self.first) < self.warmup:
            self.first.append(loss)
        base = min(self.first)
        return self.ema / base if base > 0 else float("nan")


class ParamRange(StrictModel):
    """One tuned hyperparameter: a range (`low`..`high`, optionally log-scaled) or a list of `values`."""

    low: float | None = Field(None, description="Smallest value of the range (inclusive).")
    high: float | None = Field(None, description="Largest value of the range (inclusive).")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates, weights spanning decades).")
    values: list[float] | None = Field(None, description="Explicit candidate values instead of a range (what a grid search uses).")

    @model_validator(mode="after")
    def _shape(self) -> "ParamRange":
        ranged = self.low is not None or self.high is not None
        if ranged == (self.values is not None):
            raise ValueError("give either low and high, or values")
        if self.values is not None:
            if not self.values:
                raise ValueError("values is empty: nothing to try")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"values {self.values} repeat a value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if self.low > self.high:
            raise ValueError(f"inverted range: low {self.low:g} is above high {self.high:g}")
        if self.low == self.high:
            raise ValueError(f"empty range: low equals high ({self.low:g}); give values: [{self.low:g}] to fix it")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}")
        return self

    def candidates(self) -> list[float]:
        """The values a grid tries: the listed values, or the two ends of a range."""
        return list(self.values) if self.values is not None else [self.low, self.high]  # type: ignore[list-item]

    def bounds(self) -> tuple[float, float]:
        vals = self.candidates()
        return min(vals), max(vals)


class SelectRule(StrictModel):
    """How one trial is chosen to continue to evaluation and registration."""

    max_frequency_ratio: float = Field(0.1, ge=0, description="Acceptable trials forget: forget frequency at most this fraction of the original model's (the verdict's own rule).")
    max_forget_frequency: float | None = Field(None, ge=0, le=1, description="Optional absolute ceiling on the forget frequency as well.")


class TuneSpec(StrictModel):
    """Search over the method's hyperparameters (and lr, steps) for the best forgetting/quality trade-off."""

    search: Literal["optuna", "grid"] = Field("optuna", description="optuna: multi-objective sampler (NSGA-II) over the ranges; grid: every combination of each parameter's values.")
    trials: int = Field(8, ge=1, description="Trial budget (for grid: at least the number of grid points).")
    space: dict[str, ParamRange] = Field(..., min_length=1, description="Tuned parameters: the method's own (e.g. k, lambda for retrack; lambda, scale for siss; eta for erasediff) and lr, steps of training.")
    include_default: bool = Field(True, description="Also run the spec's own method/train settings as the first trial, the baseline every other trial is compared to.")
    seeds_per_trial: int = Field(1, ge=1, description=(
        "Training seeds per trial (train.seed, train.seed + 1, ...): a trial reports the mean of their "
        "scores and keeps the model of train.seed. A 40-step fine-tune's Fréchet distance moves by up to 2x "
        "between training seeds at the same settings (docs/experiments/embedded-benchmark.md), so with one seed the search partly ranks that noise."))
    num_samples: int = Field(500, ge=16, description="Samples per trial for its forget frequency and Fréchet distance (the chosen model is evaluated again with evaluation.num_samples).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials run at once; default: as many as the cluster's CPUs (or GPUs) hold workers for.")
    collapse_ratio: float = Field(3.0, gt=1, description="Stop a trial early once its retain-branch denoising loss (smoothed) exceeds this multiple of its lowest value in the first updates: the model is collapsing.")
    report_every: int = Field(5, ge=1, description="Training updates between the health reports that early stopping watches.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting new trials after this many seconds.")
    seed: int = Field(0, description="Seed of the search sampler.")
    select: SelectRule = Field(default_factory=SelectRule)

    @model_validator(mode="after")
    def _budget(self) -> "TuneSpec":
        if self.search == "grid":
            ranged = [k for k, r in self.space.items() if r.values is None]
            if ranged:
                raise ValueError(f"grid search needs values lists, not ranges, for: {', '.join(ranged)}")
            points = math.prod(len(r.values or ()) for r in self.space.values())
            if self.trials < points:
                raise ValueError(f"a budget of {self.trials} trial(s) is smaller than the grid's {points} points")
        return self

    def check_against(self, method: MethodConfig, train: TrainConfig) -> None:
        """Every tuned name must be a parameter of the method (or lr/steps) and every candidate
        value must be valid for it: refused here, before any trial runs."""
        fields = _param_fields(method.name)
        for name, rng in self.space.items():
            if name not in fields and name not in TRAIN_KEYS:
                known = ", ".join(sorted(fields) + sorted(TRAIN_KEYS))
                raise ValueError(f"tune.space.{name}: not a parameter of method {method.name!r} (tunable: {known})")
            kind = TRAIN_KEYS.get(name) or fields[name]
            for v in rng.bounds():
                if kind is int and float(v) != int(v):
                    raise ValueError(f"tune.space.{name}: {v:g} is not an integer")
                try:
                    apply_params(method, train, {name: kind(v)})
                except InputError as exc:
                    raise ValueError(f"tune.space.{name}: {v:g} is not valid: {exc}") from None
                except ValueError as exc:
                    raise ValueError(f"tune.space.{name}: {v:g} is not valid: {str(exc).splitlines()[0]}") from None

    def kinds(self, method: str) -> dict[str, type]:
        fields = _param_fields(method)
        return {name: TRAIN_KEYS.get(name) or fields[name] for name in self.space}

    def grid(self) -> list[dict[str, float]]:
        names = list(self.space)
        return [dict(zip(names, combo)) for combo in product(*(self.space[n].candidates() for n in names))]


def _param_fields(method: str) -> dict[str, type]:
    """The method's hyperparameters by their spec name (alias), with int or float type."""
    out = {}
    for attr, f in method_class(method).Params.model_fields.items():
        if f.annotation in (int, float):
            out[f.alias or attr] = f.annotation
    return out


def apply_params(method: MethodConfig, train: TrainConfig, params: dict[str, Any]) -> tuple[MethodConfig, TrainConfig]:
    """The method and training settings with `params` (tuned values) substituted."""
    m = {k: v for k, v in params.items() if k not in TRAIN_KEYS}
    t = {k: v for k, v in params.items() if k in TRAIN_KEYS}
    validate_params(method.name, {**method.params, **m})  # its own message, naming the parameter
    new_method = MethodConfig(name=method.name, params={**method.params, **m})
    return new_method, TrainConfig.model_validate({**train.model_dump(), **t})


def default_point(space: dict[str, ParamRange], method: MethodConfig, train: TrainConfig) -> dict[str, float]:
    """The spec's own settings expressed in the tuned names (the baseline trial)."""
    resolved = validate_params(method.name, method.params).model_dump(by_alias=True)
    return {name: (getattr(train, name) if name in TRAIN_KEYS else resolved[name]) for name in space}


@dataclass
class TrialOutcome:
    """One finished trial. `status` is ok, collapsed (stopped early: quality collapse), diverged
    (non-finite loss) or failed; only ok trials carry objectives."""

    trial_id: str
    params: dict[str, float]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None
    default: bool = False

    @property
    def point(self) -> tuple[float, ...]:
        return tuple(self.metrics[o] for o in OBJECTIVES)

    def to_dict(self) -> dict:
        return asdict(self)


def dominates(a: TrialOutcome, b: TrialOutcome) -> bool:
    """a is no worse than b on every objective and better on one."""
    pa, pb = a.point, b.point
    return all(x <= y for x, y in zip(pa, pb)) and any(x < y for x, y in zip(pa, pb))


def pareto_front(outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    """The non-dominated ok trials, ordered by forget frequency."""
    ok = [o for o in outcomes if o.status == "ok" and all(math.isfinite(v) for v in o.point)]
    front = [o for o in ok if not any(dominates(p, o) for p in ok)]
    return sorted(front, key=lambda o: o.point)


class NoAcceptableTrialError(InputError):
    """No trial forgot well enough; the front is still reported."""

    code = "input.no_acceptable_trial"


def choose(outcomes: list[TrialOutcome], original_frequency: float, rule: SelectRule) -> TrialOutcome:
    """The least damaging acceptable trial (ties: the one that forgets more)."""
    limit = rule.max_frequency_ratio * original_frequency
    if rule.max_forget_frequency is not None:
        limit = min(limit, rule.max_forget_frequency)
    front = pareto_front(outcomes)
    ok = [o for o in front if o.metrics["forget_frequency"] <= limit]
    if not ok:
        best = min((o.metrics["forget_frequency"] for o in front), default=float("nan"))
        raise NoAcceptableTrialError(
            f"no trial met the forgetting target (forget frequency <= {limit:.4f}); the best reached {best:.4f} "
            f"out of {len(outcomes)} trial(s): widen the ranges or raise tune.trials"
        )
    return min(ok, key=lambda o: (o.metrics["frechet_distance"], o.metrics["forget_frequency"]))
