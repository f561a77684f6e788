"""The per-request verdict: forgotten only if generation AND the per-item membership test agree."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
        return "forgotten" if self.forgotten else "not forgotten"

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
