"""The run chain: index -> neighbours -> unlearn -> evaluate -> register, under one audit attempt.
The result's `outcome` says whether the version was promoted (`retrack run` exits by it).

Every stage writes its outputs first and its completion marker last, both keyed by the spec's
config hash under `<storage root>/<request id>/<config hash>/`; a rerun skips every stage whose
marker is there (a killed job resumes where it stopped, and unlearning itself resumes from its
last checkpoint). Everything a stage can refuse is checked before the first expensive step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from pipelines.job.context import JobContext
from pipelines.job.stages import evaluate, index, neighbours, register, unlearn
from pipelines.progress import console
from retrack.config.spec import JobSpec
from retrack.errors import StorageError
from retrack.evaluation.verdict import PROMOTED

STAGES: dict[str, Callable[[JobContext], dict]] = {
    "index": index.run, "neighbours": neighbours.run, "unlearn": unlearn.run, "evaluate": evaluate.run, "register": register.run,
}

OnStage = Callable[[str, str], None]  # (stage, "run" | "skip")


@dataclass
class JobResult:
    request_id: str
    model_version: str
    verdict: str
    report_uri: str
    metrics: dict
    outcome: str  # retrack.evaluation.verdict: promoted, not_forgotten or quality_gate
    reasons: list[str] = field(default_factory=list)  # why it was not promoted (numbers only)
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.outcome == PROMOTED


def run_job(spec: JobSpec, address: str | None = None, on_stage: OnStage | None = None) -> JobResult:
    """Run (or finish) one deletion request. `on_stage(stage, "run" | "skip")` is told of each stage."""
    return run_request(JobContext.open(spec, address), tuple(STAGES), on_stage)


def run_request(ctx: JobContext, stages: Sequence[str], on_stage: OnStage | None = None) -> JobResult:
    """Run `stages` in order as one attempt at the request, recorded in its audit trail (a
    failure too). A stage left out must have its record in `ctx` (a tuning trial's unlearning)."""
    from pipelines.runtime import ensure_ray
    from retrack.audit import audit_attempt

    ensure_ray(ctx.address)
    with audit_attempt(ctx.spec, ctx.pre.requested_forget, ctx.ran, ctx.skipped) as audit:
        run_stages(ctx, stages, on_stage)
        # A register record from before the promotion gate: its version took the alias, as every one did.
        reg = ctx.records["register"] = {"outcome": PROMOTED, "promoted": True, "gate_failed": [], "reasons": []} | ctx.records["register"]
        audit.finished(*(ctx.records[s] for s in ("neighbours", "unlearn", "evaluate")), reg)
    ev = ctx.records["evaluate"]
    return JobResult(
        request_id=ctx.spec.request_id,
        model_version=reg["model_version"],
        verdict=ev["verdict"],
        report_uri=str(ctx.jobdir.remote / "report"),
        metrics=ev["metrics"],
        outcome=reg["outcome"],
        reasons=reg["reasons"],
        stages_run=ctx.ran,
        stages_skipped=ctx.skipped,
    )


def run_stages(ctx: JobContext, stages: Sequence[str], on_stage: OnStage | None = None) -> None:
    """Run each stage unless its completion marker is there; its record lands in `ctx.records`."""
    jobdir = ctx.jobdir
    for name in stages:
        record = jobdir.done(name)
        if record is not None:
            ctx.skipped.append(name)
            if on_stage:
                on_stage(name, "skip")
        else:
            if on_stage:
                on_stage(name, "run")
            console.rule(f"[bold]{name}")
            try:
                outputs = STAGES[name](ctx)
            except OSError as exc:  # disk full, quota, permission: a clear error, and no marker below
                raise StorageError(f"{name} stage: cannot write its outputs ({jobdir.local}, {jobdir.remote}): {exc}") from None
            jobdir.finish(name, outputs)
            record = {"config_hash": jobdir.spec.config_hash(), **outputs}
            ctx.ran.append(name)
        ctx.records[name] = record
