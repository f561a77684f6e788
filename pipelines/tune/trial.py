"""One Ray Tune trial: train a configuration (Ray Train workers, through the unlearn stage's own
call), then score its model in-process on the original's sampling seeds; and what Tune learns
of a finished trial."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipelines.job import JobContext
from retrack.evaluation.pixel import METRIC_KEYS, EvalReference
from retrack.storage.location import Location
from retrack.tuning.search import HEALTH_METRIC, TrialOutcome, apply_params

TUNE_DIR = "tune"  # under the job prefix: Ray Tune's experiment, the trials' models, the front


@dataclass
class TrialContext:
    """What every trial needs, shipped once through the object store."""

    job: JobContext  # the tuning job: its inputs, and the neighbours every trial slices
    kinds: dict[str, type]
    reference: EvalReference
    original_samples01: np.ndarray


def trial_params(config: dict, kinds: dict[str, type]) -> dict[str, float]:
    return {name: kind(config[name]) for name, kind in kinds.items()}


def trial_key(params: dict[str, float]) -> str:
    from retrack.digest import config_digest

    return config_digest(params)[:12]


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: train, then score the model on the original's sampling seeds; with
    `tune.seeds_per_trial` > 1, once per training seed, reporting the mean."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.job.stages.unlearn import train as unlearn_train
    from pipelines.unlearn.driver import TrainMonitor
    from retrack.errors import QualityCollapseError, TrainingDivergedError
    from retrack.evaluation.pixel import evaluate_model
    from retrack.models.pixel import load_pixel_model
    from retrack.storage.cache import local_model_dir

    job = ctx.job
    params = trial_params(config, ctx.kinds)
    method, train = apply_params(job.spec.method, job.spec.train, params)
    spec = job.spec.model_copy(update={"method": method, "train": train, "tune": None})
    key = trial_key(params)
    # Under the job prefix in storage: a trial may run on any node, the driver reads its outcome.
    models = job.jobdir.remote / TUNE_DIR / "models"
    out = models / key
    record = job.jobdir.remote / TUNE_DIR / "outcomes" / f"{key}.json"
    saved = saved_outcome(record, out)
    if saved is not None:
        tune.report(tune_result(saved))
        return

    def finish(report: dict) -> None:
        record.write_json(report)
        tune.report(tune_result(report))

    tuning = job.spec.tune
    per_seed, kept = [], None
    for n in range(tuning.seeds_per_trial):
        seed = train.seed + n
        # The trial keeps train.seed's model; another seed's is scored, then deleted.
        seed_out = out if n == 0 else models / f"{key}.seed-{seed}"
        name = f"{job.spec.run_name}-trial-{key}" + (f"-seed-{seed}" if n else "")
        # The trial's configuration over the tuning job's inputs and neighbours.
        seed_job = replace(job, spec=spec.model_copy(update={"train": train.model_copy(update={"seed": seed})}))
        monitor = TrainMonitor(every=tuning.report_every, callbacks=(TuneReportCallback(),), collapse_ratio=tuning.collapse_ratio)
        try:
            result = unlearn_train(seed_job, str(seed_out), name, monitor=monitor)
        except QualityCollapseError as exc:
            finish({"status": "collapsed", "stopped_step": exc.step, HEALTH_METRIC: exc.ratio, "seed": seed})
            return
        except TrainingDivergedError as exc:
            finish({"status": "diverged", "stopped_step": exc.step, "seed": seed})
            return
        metrics, _ = evaluate_model(load_pixel_model(local_model_dir(seed_out.uri, s3=seed_out.s3)), ctx.reference, tuning.num_samples, job.spec.evaluation.seed, ctx.original_samples01)
        per_seed.append({"seed": seed, **{k: metrics[k] for k in METRIC_KEYS if k in metrics}, "unlearn_seconds": result.seconds})
        if n == 0:
            kept = result
        else:
            seed_out.remove()
    mean = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0] if k != "seed"}
    finish({"status": "ok", **mean, "model_dir": out.uri, "model_digest": kept.digest, "steps_done": kept.steps, "per_seed": per_seed})


def tune_result(report: dict) -> dict:
    """What Tune sees of a trial's record: its scalars (the per-seed scores stay in the record)."""
    return {k: v for k, v in report.items() if k != "per_seed"}


def saved_outcome(record: Location, model: Location) -> dict | None:
    """The final report a trial with these parameters already made, if its model is still the
    one it scored. Tune saves its experiment state at most every 10 s, so a trial that finished
    just before the driver was killed runs again on restore: it repeats its report instead of
    training and scoring again (which would also report 0 s of unlearning for a reused model)."""
    from retrack.models.pixel import DIGEST_FILE

    if not record.exists():
        return None
    saved = record.read_json()
    marker = model / DIGEST_FILE
    if saved["status"] != "ok" or (marker.exists() and marker.read_json()["sha256"] == saved["model_digest"]):
        return saved
    return None


def outcome(trial_id: str, config: dict, kinds: dict[str, type], result: dict | None, failed: bool, default: dict) -> TrialOutcome:
    """Classify a finished trial from its last reported result."""
    params = trial_params(config, kinds)
    result = result or {}
    status = "failed" if failed else result.get("status", "failed")
    metrics = {k: float(result[k]) for k in (*METRIC_KEYS, "unlearn_seconds", HEALTH_METRIC, "stopped_step", "steps_done") if isinstance(result.get(k), (int, float))}
    return TrialOutcome(trial_id=trial_id, params=params, status=status, metrics=metrics,
                        model_dir=result.get("model_dir") if status == "ok" else None, default=params == default)
