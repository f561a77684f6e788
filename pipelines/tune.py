"""`retrack tune JOB.yaml`: search the method's hyperparameters with Ray Tune, show the Pareto
front of forgetting vs quality damage, and carry the chosen configuration through evaluation and
registration exactly as `retrack run` does.

- Everything refusable is refused first (the spec's `tune` section included: empty or inverted
  ranges, a budget under one trial or one grid pass, K above the retained set).
- The index and neighbours stages run once, with K at the largest value searched; a trial with a
  smaller K uses the nearest K of those.
- Each trial is a Ray Tune driver function that builds the Ray Train `TorchTrainer` (the Train V2
  pattern) through `pipelines.unlearn.unlearn`, then scores its model in-process on the same
  sampling seeds as the original; with `tune.seeds_per_trial` > 1 it trains and scores once per
  training seed and reports the mean (one seed's score is partly noise). While training, the
  workers report one health scalar (the retain-loss ratio, `retrack.tuning.RetainLossRatio`)
  through Tune's TuneReportCallback; a trial whose ratio passes `tune.collapse_ratio` stops itself
  there (the workers end cleanly, so Ray Train frees their resources; a trial killed from outside
  would leave its workers' placement group behind), and a non-finite loss ends a trial at once.
- Trials are MLflow child runs of the request's tuning run, logged from the driver by a Tune
  callback (Ray's MLflow callback would not nest them).
- The experiment lives under the job's storage prefix: rerunning the command restores it
  (`Tuner.restore`) and finished trials are not run again (one that finished after Tune last
  saved its state repeats its recorded report, without training or scoring again).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from pipelines.job import JobDir, Preflight, evaluation_reference, preflight, run_job, unlearn_request
from pipelines.progress import console
from retrack.errors import InputError
from retrack.evaluation.pixel import METRIC_KEYS, EvalReference
from retrack.config.spec import JobSpec
from retrack.storage.location import Location
from retrack.tuning.search import (
    HEALTH_METRIC,
    OBJECTIVES,
    TrialOutcome,
    apply_params,
    choose,
    default_point,
    pareto_front,
)

TUNE_DIR = "tune"  # under the job prefix: Ray Tune's experiment, the trials' models, the front
EXPERIMENT = "experiment"


@dataclass
class TrialContext:
    """What every trial needs, shipped once through the object store."""

    spec: JobSpec
    pre: Preflight
    kinds: dict[str, type]
    reference: EvalReference
    original_samples01: np.ndarray


@dataclass
class Search:
    outcomes: list[TrialOutcome]
    front: list[TrialOutcome]
    original: dict[str, float]  # the original model's scores on the same seeds
    parent_run_id: str
    job: JobDir


@dataclass
class TuneResult:
    outcomes: list[TrialOutcome]
    front: list[TrialOutcome]
    chosen: TrialOutcome
    original: dict[str, float]
    parent_run_id: str
    job: Any  # the chosen configuration's JobResult


def trial_params(config: dict, kinds: dict[str, type]) -> dict[str, float]:
    return {name: kind(config[name]) for name, kind in kinds.items()}


def trial_key(params: dict[str, float]) -> str:
    from retrack.digest import config_digest

    return config_digest(params)[:12]


def _trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: train (Ray Train workers), then score the model on the original's sampling
    seeds; with `tune.seeds_per_trial` > 1, once per training seed, reporting the mean."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.unlearn import TrainMonitor, unlearn
    from retrack.errors import QualityCollapseError, TrainingDivergedError
    from retrack.evaluation.pixel import evaluate_model
    from retrack.models.pixel import load_pixel_model

    params = trial_params(config, ctx.kinds)
    method, train = apply_params(ctx.spec.method, ctx.spec.train, params)
    spec = ctx.spec.model_copy(update={"method": method, "train": train, "tune": None})
    job = JobDir(ctx.spec)
    key = trial_key(params)
    out = job.local / TUNE_DIR / "models" / key
    record = Location.parse(job.local / TUNE_DIR / "outcomes" / f"{key}.json")
    saved = _saved_outcome(record, out)
    if saved is not None:
        tune.report(_tune_result(saved))
        return

    def finish(report: dict) -> None:
        record.write_json(report)
        tune.report(_tune_result(report))

    tuning = ctx.spec.tune
    per_seed, kept = [], None
    for n in range(tuning.seeds_per_trial):
        seed = train.seed + n
        # The trial keeps train.seed's model; another seed's is scored, then deleted.
        seed_out = out if n == 0 else out.with_name(f"{key}.seed-{seed}")
        name = f"{ctx.spec.run_name}-trial-{key}" + (f"-seed-{seed}" if n else "")
        seed_spec = spec.model_copy(update={"train": train.model_copy(update={"seed": seed})})
        monitor = TrainMonitor(every=tuning.report_every, callbacks=(TuneReportCallback(),), collapse_ratio=tuning.collapse_ratio)
        try:
            result = unlearn(unlearn_request(seed_spec, ctx.pre, job, seed_out, name), monitor=monitor)
        except QualityCollapseError as exc:
            finish({"status": "collapsed", "stopped_step": exc.step, HEALTH_METRIC: exc.ratio, "seed": seed})
            return
        except TrainingDivergedError as exc:
            finish({"status": "diverged", "stopped_step": exc.step, "seed": seed})
            return
        metrics, _ = evaluate_model(load_pixel_model(seed_out), ctx.reference, tuning.num_samples, ctx.spec.evaluation.seed, ctx.original_samples01)
        per_seed.append({"seed": seed, **{k: metrics[k] for k in METRIC_KEYS if k in metrics}, "unlearn_seconds": result.seconds})
        if n == 0:
            kept = result
        else:
            shutil.rmtree(seed_out, ignore_errors=True)
    mean = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0] if k != "seed"}
    finish({"status": "ok", **mean, "model_dir": str(out), "model_digest": kept.digest, "steps_done": kept.steps, "per_seed": per_seed})


def _tune_result(report: dict) -> dict:
    """What Tune sees of a trial's record: its scalars (the per-seed scores stay in the record)."""
    return {k: v for k, v in report.items() if k != "per_seed"}


def _saved_outcome(record: Location, model_dir: Path) -> dict | None:
    """The final report a trial with these parameters already made, if its model is still the
    one it scored. Tune saves its experiment state at most every 10 s, so a trial that finished
    just before the driver was killed runs again on restore: it repeats its report instead of
    training and scoring again (which would also report 0 s of unlearning for a reused model)."""
    from retrack.models.pixel import model_digest

    if not record.exists():
        return None
    saved = record.read_json()
    if saved["status"] != "ok" or (model_dir.is_dir() and model_digest(model_dir) == saved["model_digest"]):
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


class MultiObjectiveOptuna(OptunaSearch):
    """A trial stopped early (collapse) or ended by a NaN reports no objectives: Optuna records it
    as pruned instead of failing to `tell` a list of Nones."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result is not None and any(result.get(m) is None for m in OBJECTIVES):
            result = None
        super().on_trial_complete(trial_id, result, error)


class TrialRuns(tune.Callback):
    """Each finished trial as an MLflow child run of the tuning run: its parameters, objectives
    and status. Runs in the driver process (one writer for the store); the client is made on
    first use so the experiment state Tune saves for a restore stays picklable."""

    def __init__(self, tracking_uri: str, parent_run_id: str, kinds: dict[str, type], default: dict):
        self.tracking_uri, self.parent_run_id, self.kinds, self.default = tracking_uri, parent_run_id, kinds, default
        self._store = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def _log(self, trial, failed: bool) -> None:
        from retrack.lineage.store import LineageStore

        self._store = self._store or LineageStore(self.tracking_uri)
        o = outcome(trial.trial_id, trial.config, self.kinds, trial.last_result, failed, self.default)
        key = trial_key(o.params)
        run_id = self._store.child_run(self.parent_run_id, f"trial-{key}", key)
        self._store.log_params(run_id, {**o.params, "status": o.status, "default": o.default})
        if o.metrics:
            self._store.log_metrics(run_id, o.metrics)
        self._store.finish_run(run_id, "FAILED" if o.status == "failed" else "FINISHED")
        objs = ", ".join(f"{k} {o.metrics[k]:.4g}" for k in OBJECTIVES if k in o.metrics)
        console.print(f"trial {key} {o.params}: {o.status}" + (f" ({objs})" if objs else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._log(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._log(trial, failed=True)


def _searcher_and_space(spec: JobSpec, default: dict[str, float], concurrency: int):
    """(search algorithm, param space, num_samples) for the spec's `tune` section; at most
    `concurrency` trials run at once."""
    tuning = spec.tune
    kinds = tuning.kinds(spec.method.name)
    if tuning.search == "grid":
        from ray.tune.search import BasicVariantGenerator

        space = {n: tune.grid_search([kinds[n](v) for v in r.values]) for n, r in tuning.space.items()}
        in_grid = all(default[n] in [kinds[n](v) for v in r.values] for n, r in tuning.space.items())
        points = [default] if tuning.include_default and not in_grid else None
        # Tune applies max_concurrent_trials only to Searchers: the grid generator limits itself.
        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency), space, 1
    import optuna

    space = {}
    for name, r in tuning.space.items():
        if r.values is not None:
            space[name] = tune.choice([kinds[name](v) for v in r.values])
        elif kinds[name] is int:
            space[name] = (tune.lograndint if r.log else tune.randint)(int(r.low), int(r.high) + 1)
        else:
            space[name] = (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
    # TPE handles several objectives (MOTPE); its startup trials are random, the rest model the front.
    sampler = optuna.samplers.TPESampler(seed=tuning.seed, n_startup_trials=max(1, tuning.trials // 2))
    searcher = MultiObjectiveOptuna(
        metric=list(OBJECTIVES), mode=["min"] * len(OBJECTIVES), sampler=sampler,
        points_to_evaluate=[default] if tuning.include_default else None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency), space, tuning.trials


def max_concurrent_trials(spec: JobSpec) -> int:
    """As many trials as the cluster holds worker groups for."""
    import ray

    if spec.tune.max_concurrent_trials:
        return spec.tune.max_concurrent_trials
    res = ray.cluster_resources()
    if spec.scaling.use_gpu:
        per = spec.scaling.num_workers
        return max(1, int(res.get("GPU", 0) // per))
    per = spec.scaling.num_workers * spec.scaling.cpus_per_worker
    return max(1, int(res.get("CPU", 1) // per))


def _largest_k_spec(spec: JobSpec) -> JobSpec:
    """The spec with K at the largest value searched (the neighbours every trial slices)."""
    space = spec.tune.space
    if "k" not in space:
        return spec
    k = int(max(space["k"].bounds()[1], spec.method.k))
    return spec.model_copy(update={"method": apply_params(spec.method, spec.train, {"k": k})[0]})


def search(spec: JobSpec, address: str | None = None) -> Search:
    """Run (or resume) the search of `spec.tune`: every trial's outcome, the front, the original's scores."""
    import os

    from pipelines.runtime import ensure_ray
    from pipelines.job import _index_stage, _neighbours_stage
    from retrack.evaluation.pixel import evaluate_model
    from retrack.lineage.store import LineageStore
    from retrack.models.pixel import load_pixel_model

    if spec.tune is None:
        raise InputError("the job spec has no `tune` section: add one with the search space (see `retrack schema`)")
    if spec.model.kind != "pixel-ddpm":
        raise InputError(f"model.kind {spec.model.kind!r}: `retrack tune` scores trials with the pixel-DDPM metrics (forget frequency, Fréchet distance); tune Stable Diffusion requests by hand with `retrack run`")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The health reports during training carry no objectives (only a trial's final result does);
    # Tune would otherwise reject them when a searcher names its metrics.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    wide = _largest_k_spec(spec)
    pre = preflight(wide)  # K checked against the retained set at its largest
    job = JobDir(spec)
    ensure_ray(address)
    # `wide` only widens K; its index and neighbours land in the tuning job's own prefix.
    idx, _ = job.stage("index", lambda: _index_stage(wide, pre))
    job.stage("neighbours", lambda: _neighbours_stage(wide, pre, job, idx))

    console.rule("[bold]tune")
    forget = job.fetch("forget_ids.txt").read_text().split()
    reference, _ = evaluation_reference(spec, pre, job, forget)
    original, original_samples = evaluate_model(load_pixel_model(pre.model_dir), reference, spec.tune.num_samples, spec.evaluation.seed)
    console.print(f"original: forget frequency {original['forget_frequency']:.4f}, Fréchet distance {original['frechet_distance']:.2f}")

    store = LineageStore(spec.mlflow.tracking_uri)
    parent = store.request_run(spec.mlflow.experiment, spec.run_name, spec.request_id, spec.config_hash(), spec.mlflow.artifact_location)
    store.log_params(parent, {"tune.search": spec.tune.search, "tune.trials": spec.tune.trials, "method": spec.method.name,
                              "tune.space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in spec.tune.space.items()}, sort_keys=True)})
    store.log_metrics(parent, {f"original.{k}": v for k, v in original.items() if k in OBJECTIVES})

    kinds = spec.tune.kinds(spec.method.name)
    default = default_point(spec.tune.space, spec.method, spec.train)
    ctx = TrialContext(spec=spec, pre=pre, kinds=kinds, reference=reference, original_samples01=original_samples)
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"memory": 256 * 1024**2})
    results = _fit(spec, job, trainable, default, parent)
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
        _write_front(found.job, found.outcomes, found.front, found.original, chosen)
        found.job.publish(TUNE_DIR)
    console.print(f"[bold]chosen[/]: {chosen.params} (forget frequency {chosen.metrics['forget_frequency']:.4f}, Fréchet distance {chosen.metrics['frechet_distance']:.2f})")
    store = LineageStore(spec.mlflow.tracking_uri)
    store.log_params(found.parent_run_id, {f"chosen.{k}": v for k, v in chosen.params.items()})

    final_spec, final = _continue_with(spec, chosen, address)
    # The registration run joins the trials under the tuning run: one tree per request in MLflow.
    store.client.set_tag(JobDir(final_spec).done("register")["run_id"], "mlflow.parentRunId", found.parent_run_id)
    store.finish_run(found.parent_run_id)
    return TuneResult(outcomes=found.outcomes, front=found.front, chosen=chosen, original=found.original, parent_run_id=found.parent_run_id, job=final)


def _fit(spec: JobSpec, job: JobDir, trainable, default: dict, parent_run_id: str):
    searcher, space, samples = _searcher_and_space(spec, default, max_concurrent_trials(spec))
    base = job.remote / TUNE_DIR  # on the job's own filesystem (local or S3)
    fs = base.fs if base.is_s3 else None
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=base.path, storage_filesystem=fs, verbose=0,
        callbacks=[TrialRuns(spec.mlflow.tracking_uri, parent_run_id, spec.tune.kinds(spec.method.name), default)],
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


def _continue_with(spec: JobSpec, chosen: TrialOutcome, address: str | None) -> tuple[JobSpec, Any]:
    """The chosen trial's model becomes the unlearn stage of a plain job (no `tune` section), so
    `retrack run`'s evaluate and register stages finish the request without training again."""
    from retrack.models.pixel import DIGEST_FILE

    method, train = apply_params(spec.method, spec.train, chosen.params)
    final = spec.model_copy(update={"method": method, "train": train, "tune": None})
    job = JobDir(final)
    if job.done("unlearn") is None:
        dest = job.local / "model"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(chosen.model_dir, dest)
        digest = json.loads((dest / DIGEST_FILE).read_text())["sha256"]
        job.publish("model")
        job.finish("unlearn", {"model_digest": digest, "wall_seconds": chosen.metrics.get("unlearn_seconds", 0.0),
                               "steps": int(chosen.metrics.get("steps_done", train.steps)), "final_loss": None, "tuned_trial": chosen.trial_id})
    return final, run_job(final, address=address)
