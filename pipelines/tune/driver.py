"""`retrack tune JOB.yaml`: search the method's hyperparameters with Ray Tune, show the Pareto
front of forgetting vs quality damage, and finish the request with the chosen configuration
through `retrack run`'s own evaluate and register stages.

- Everything refusable is refused first (the spec's `tune` section included: empty or inverted
  ranges, a budget under one trial or one grid pass, K above the retained set).
- The index and neighbours stages run once, with K at the largest value searched; a trial with a
  smaller K uses the nearest K of those.
- Each trial (`trial.run_trial`) builds the Ray Train `TorchTrainer` (the Train V2 pattern)
  through the unlearn stage's own call, then scores its model in-process on the same sampling
  seeds as the original; with `tune.seeds_per_trial` > 1 it trains and scores once per training
  seed and reports the mean (one seed's score is partly noise). While training, the workers
  report one health scalar (the retain-loss ratio, `retrack.tuning.RetainLossRatio`) through
  Tune's TuneReportCallback; a trial whose ratio passes `tune.collapse_ratio` stops itself there
  (the workers end cleanly, so Ray Train frees their resources; a trial killed from outside would
  leave its workers' placement group behind), and a non-finite loss ends a trial at once.
- Trials are MLflow child runs of the request's tuning run (`callbacks.TrialRuns`).
- The experiment lives under the job's storage prefix: rerunning the command restores it
  (`Tuner.restore`) and finished trials are not run again (one that finished after Tune last
  saved its state repeats its recorded report, without training or scoring again).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from ray import tune

from pipelines.job import JobContext, JobDir, JobResult, preflight, run_request, run_stages
from pipelines.job.reference import pixel_reference
from pipelines.progress import console, stage_progress
from pipelines.tune.callbacks import TrialProgress, TrialRuns
from pipelines.tune.space import largest_k_spec, max_concurrent_trials, search_algorithm
from pipelines.tune.trial import TUNE_DIR, TrialContext, outcome, run_trial
from retrack.config.spec import JobSpec
from retrack.errors import InputError
from retrack.tuning.search import OBJECTIVES, TrialOutcome, apply_params, choose, default_point, pareto_front

EXPERIMENT = "experiment"


@dataclass
class Search:
    outcomes: list[TrialOutcome]
    front: list[TrialOutcome]
    original: dict[str, float]  # the original model's scores on the same seeds
    parent_run_id: str
    job: JobContext  # the tuning job


@dataclass
class TuneResult:
    outcomes: list[TrialOutcome]
    front: list[TrialOutcome]
    chosen: TrialOutcome
    original: dict[str, float]
    parent_run_id: str
    job: JobResult  # the chosen configuration's


def search(spec: JobSpec, address: str | None = None) -> Search:
    """Run (or resume) the search of `spec.tune`: every trial's outcome, the front, the original's scores."""
    from pipelines.runtime import ensure_ray
    from retrack.evaluation.pixel import evaluate_model
    from retrack.lineage.store import LineageStore
    from retrack.models.pixel import load_pixel_model

    if spec.tune is None:
        raise InputError("the job spec has no `tune` section: add one with the search space (see `retrack schema`)")
    # The health reports during training carry no objectives (only a trial's final result does);
    # Tune would otherwise reject them when a searcher names its metrics.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    wide = largest_k_spec(spec)
    # K checked against the retained set at its largest; `wide` only widens K, and its index and
    # neighbours land in the tuning job's own prefix.
    widest = JobContext(spec=wide, pre=preflight(wide, address), jobdir=JobDir(spec), address=address)
    ensure_ray(address)
    run_stages(widest, ("index", "neighbours"))
    job = replace(widest, spec=spec)

    console.rule("[bold]tune")
    reference, _ = pixel_reference(job, job.forget_set())
    with stage_progress("tune") as progress:
        original, original_samples = evaluate_model(load_pixel_model(job.pre.model_dir), reference, spec.tune.num_samples, spec.evaluation.seed,
                                                     progress=lambda done, n: progress("original samples", done, n))
    console.print(f"original: forget frequency {original['forget_frequency']:.4f}, Fréchet distance {original['frechet_distance']:.2f}")

    store = LineageStore(spec.mlflow.tracking_uri)
    parent = store.request_run(spec.mlflow.experiment, spec.run_name, spec.request_id, spec.config_hash(), spec.mlflow.artifact_location)
    store.log_params(parent, {"tune.search": spec.tune.search, "tune.trials": spec.tune.trials, "method": spec.method.name,
                              "tune.space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in spec.tune.space.items()}, sort_keys=True)})
    store.log_metrics(parent, {f"original.{k}": v for k, v in original.items() if k in OBJECTIVES})

    kinds = spec.tune.kinds(spec.method.name)
    default = default_point(spec.tune.space, spec.method, spec.train)
    ctx = TrialContext(job=job, kinds=kinds, reference=reference, original_samples01=original_samples)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"memory": 256 * 1024**2})
    results = _fit(spec, job.jobdir, trainable, default, parent)
    outcomes = [outcome(r.metrics.get("trial_id", str(n)) if r.metrics else str(n), r.config, kinds, r.metrics, r.error is not None, default)
                for n, r in enumerate(results)]
    return Search(outcomes=outcomes, front=pareto_front(outcomes), original=original, parent_run_id=parent, job=job)


def run_tune(spec: JobSpec, address: str | None = None) -> TuneResult:
    """Search, report the front, and finish the request with the chosen configuration."""
    from retrack.lineage.store import LineageStore

    found = search(spec, address)
    _print_front(found.outcomes, found.front)
    chosen = None
    try:
        chosen = choose(found.outcomes, found.original["forget_frequency"], spec.tune.select)
    finally:  # the front is written whether or not a trial qualified
        _write_front(found.job.jobdir, found.outcomes, found.front, found.original, chosen)
        found.job.jobdir.publish(TUNE_DIR)
    console.print(f"[bold]chosen[/]: {chosen.params} (forget frequency {chosen.metrics['forget_frequency']:.4f}, Fréchet distance {chosen.metrics['frechet_distance']:.2f})")
    store = LineageStore(spec.mlflow.tracking_uri)
    store.log_params(found.parent_run_id, {f"chosen.{k}": v for k, v in chosen.params.items()})

    final, result = _finish_with(found.job, chosen)
    # The registration run joins the trials under the tuning run: one tree per request in MLflow.
    store.client.set_tag(final.records["register"]["run_id"], "mlflow.parentRunId", found.parent_run_id)
    store.finish_run(found.parent_run_id)
    return TuneResult(outcomes=found.outcomes, front=found.front, chosen=chosen, original=found.original,
                      parent_run_id=found.parent_run_id, job=result)


def _finish_with(job: JobContext, chosen: TrialOutcome) -> tuple[JobContext, JobResult]:
    """The chosen configuration as a plain job (no `tune` section) under its own prefix: the
    chosen trial's model is handed to its evaluate and register stages, so nothing trains again."""
    from retrack.models.pixel import model_digest

    spec = job.spec
    method, train = apply_params(spec.method, spec.train, chosen.params)
    final = job.for_spec(spec.model_copy(update={"method": method, "train": train, "tune": None}))
    final.model = chosen.model_dir
    final.records["unlearn"] = {"model_digest": model_digest(final.unlearned_model()), "wall_seconds": chosen.metrics.get("unlearn_seconds", 0.0),
                                "steps": int(chosen.metrics.get("steps_done", train.steps)), "final_loss": None, "tuned_trial": chosen.trial_id}
    return final, run_request(final, ("index", "neighbours", "evaluate", "register"))


def _fit(spec: JobSpec, job: JobDir, trainable, default: dict, parent_run_id: str):
    searcher, space, samples = search_algorithm(spec, default, max_concurrent_trials(spec))
    base = job.remote / TUNE_DIR  # on the job's own filesystem (local or S3)
    fs = base.fs if base.is_s3 else None
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=base.path, storage_filesystem=fs, verbose=0,
        callbacks=[TrialRuns(spec.mlflow.tracking_uri, parent_run_id, spec.tune.kinds(spec.method.name), default), TrialProgress()],
    )
    path = f"{base.path}/{EXPERIMENT}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        console.print("resuming the tuning run: finished trials are kept")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space, run_config=run_config,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=samples, time_budget_s=spec.tune.time_budget_s),
        )
    return tuner.fit()


def _write_front(job: JobDir, outcomes: list[TrialOutcome], front: list[TrialOutcome], original: dict, chosen: TrialOutcome | None) -> None:
    from retrack.tuning.plot import plot_fronts

    out = job.local / TUNE_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials.json").write_text(json.dumps([o.to_dict() for o in outcomes], indent=2))
    (out / "pareto.json").write_text(json.dumps({"objectives": list(OBJECTIVES), "original": {k: original[k] for k in OBJECTIVES},
                                                 "front": [o.to_dict() for o in front],
                                                 "chosen": chosen.to_dict() if chosen else None}, indent=2))
    plot_fronts({job.spec.method.name: outcomes}, out / "pareto.png", original={k: original[k] for k in OBJECTIVES}, chosen=chosen)


def _print_front(outcomes: list[TrialOutcome], front: list[TrialOutcome]) -> None:
    from rich.table import Table

    names = sorted({k for o in outcomes for k in o.params})
    table = Table(title="trials (* = Pareto front)")
    for col in ("", *names, "status", *OBJECTIVES):
        table.add_column(col)
    on_front = {id(o) for o in front}
    for o in sorted(outcomes, key=lambda o: (o.status != "ok", o.point if o.status == "ok" else ())):
        objs = [f"{o.metrics[k]:.4g}" if k in o.metrics else "-" for k in OBJECTIVES]
        table.add_row("*" if id(o) in on_front else "", *(f"{o.params[n]:.4g}" for n in names), o.status + (" (default)" if o.default else ""), *objs)
    console.print(table)
