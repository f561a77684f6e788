"""The per-request verdict: forgotten only if generation AND the per-item membership test agree;
and the promotion decision: the alias moves only to a forgotten version within the quality gate."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORGOTTEN = "forgotten"


@dataclass
class Verdict:
    forgotten: bool
    reasons: list[str]
    frequency_before: float
    frequency_after: float
    remembered_items: int
    items: int

    @property
    def label(self) -> str:
        return FORGOTTEN if self.forgotten else "not forgotten"

    def to_dict(self) -> dict:
        return {"verdict": self.label, **asdict(self)}


def decide(before: dict, after: dict, membership: dict | None, max_frequency_ratio: float) -> Verdict:
    """`before`/`after`: metrics of the original and the unlearned model; `membership`: the
    unlearned model's per-item test (None when no held-out data was given)."""
    reasons = []
    f0, f1 = before["forget_frequency"], after["forget_frequency"]
    limit = max_frequency_ratio * f0
    if f1 > limit and f1 > 0:
        reasons.append(f"forget frequency {f1:.4f} is above {max_frequency_ratio:g} x the original's {f0:.4f}")
    remembered = 0 if membership is None else int(membership["remembered_count"])
    items = 0 if membership is None else len(membership["percentiles"])
    if remembered:
        reasons.append(f"{remembered} of {items} forgotten item(s) still have a denoising loss below the non-members' {membership['alpha']:g}-quantile")
    return Verdict(forgotten=not reasons, reasons=reasons, frequency_before=f0, frequency_after=f1, remembered_items=remembered, items=items)


# The promotion decision: the verdict first, then the quality gate's ceilings.
PROMOTED, NOT_FORGOTTEN, QUALITY_GATE = "promoted", "not_forgotten", "quality_gate"

# Each gate ceiling: the figure it bounds, from the original's and the unlearned model's metrics.
GATE_FIGURES = {
    "max_frechet_ratio": ("Fréchet ratio", lambda before, after: after["frechet_distance"] / before["frechet_distance"]),
    "max_integrity_ratio": ("integrity ratio", lambda before, after: after["integrity_ratio"]),
}


@dataclass
class Promotion:
    """Whether a registered version may take the alias: `outcome` is promoted, not_forgotten (the
    verdict failed; the gate is still checked and reported) or quality_gate; `gate_failed` names
    the ceilings missed; `reasons` says why in words (numbers only)."""

    outcome: str
    gate_failed: list[str]
    reasons: list[str]

    @property
    def promoted(self) -> bool:
        return self.outcome == PROMOTED

    def to_dict(self) -> dict:
        return {**asdict(self), "promoted": self.promoted}

    def tags(self) -> dict[str, str]:
        """What the model version records of the decision."""
        return {"outcome": self.outcome, "gate": "failed: " + ", ".join(self.gate_failed) if self.gate_failed else "passed"}


def quality_gate(before: dict, after: dict, ceilings: dict[str, float]) -> list[tuple[str, str]]:
    """(ceiling, reason) for each ceiling the unlearned model's figures exceed; a figure the
    evaluation did not measure fails its ceiling (nothing is promoted unchecked)."""
    failed = []
    for name, limit in ceilings.items():
        what, figure = GATE_FIGURES[name]
        try:
            value = figure(before, after)
        except KeyError as missing:
            failed.append((name, f"quality gate: {missing} was not measured, so {name} cannot be checked"))
            continue
        if not value <= limit:  # a NaN fails too
            failed.append((name, f"quality gate: {what} {value:.4g} is above {name} {limit:g}"))
    return failed


def promotion(verdict: str, verdict_reasons: list[str], before: dict, after: dict, ceilings: dict[str, float]) -> Promotion:
    """The decision for a version whose verdict (`Verdict.label`) and metrics the evaluation gave."""
    gate = quality_gate(before, after, ceilings)
    outcome = NOT_FORGOTTEN if verdict != FORGOTTEN else QUALITY_GATE if gate else PROMOTED
    return Promotion(outcome=outcome, gate_failed=[n for n, _ in gate], reasons=[*verdict_reasons, *(r for _, r in gate)])
