"""The unlearn stage's driver: check and plan everything before Ray does any work, run the Ray
Train `TorchTrainer`, and turn the final checkpoint into the output model.

1. `prepare` checks the model directory and kind, the corpus, the forget ids, the method and
   batch arithmetic, and plans the data (retrack/training/prepare.py); the cluster must be able
   to place the workers, and an existing run under the same (checkpoint root, run name) must
   belong to the same config. The run name is `<request id>-<config hash>`.
2. Ray Data delivers the rows the plan draws (datasets.py); the workers train (worker.py).
3. `FailureConfig` restarts a failed worker group from the latest checkpoint; relaunching with
   the same run name resumes the same way; a run that stopped (non-finite loss, quality
   collapse) stops every retry and relaunch at once and saves nothing as final.
4. The final checkpoint becomes the output model (retrack/training/output.py).

Tolerance: W workers reproduce one process up to float32 summation order and thread count (for
Stable Diffusion, one process that trains on the same fp16 encodings the item cache keeps). Measured on CPU:
1 vs 2 workers gave bitwise equal loss curves over 30 steps (benchmarks/results/train.json) and
final weights within ~5e-7 of the single process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.corpus_ids import RayScan
from pipelines.runtime import ensure_ray, unwrap
from pipelines.unlearn.datasets import DATA_CONFIG, build_datasets
from pipelines.unlearn.placement import check_placement, worker_resources
from pipelines.unlearn.progress import Progress, ProgressRelay
from pipelines.unlearn.resume import resume
from pipelines.unlearn.worker import SETTINGS_KEY, WorkerSettings, train_loop
from retrack.config.model_kind import ModelKind
from retrack.config.unlearn_run import UnlearnRun
from retrack.errors import UnlearnFailedError, stopped_error
from retrack.storage.location import S3Options, is_s3
from retrack.training.output import existing_output, save_output
from retrack.training.prepare import CorpusIndex, Prepared, latent_index, prepare
from retrack.training.run_storage import RunStorage


@dataclass(frozen=True)
class TrainMonitor:
    """Live health for an outer controller (a Ray Tune trial): every `every` updates the workers
    report the retain-loss ratio, which `callbacks` (Ray Train UserCallbacks such as Tune's
    TuneReportCallback) pass on; above `collapse_ratio` (or NaN) the workers stop, and `unlearn`
    raises QualityCollapseError."""

    every: int
    callbacks: tuple = ()
    collapse_ratio: float | None = None


@dataclass
class UnlearnResult:
    output_dir: str
    digest: str
    run_name: str
    config_hash: str
    steps: int
    history: list[dict]
    seconds: float
    model_kind: ModelKind
    resumed_from: list[int] = field(default_factory=list)  # the step each resumed attempt started from
    skipped: bool = False  # the output already existed for this config hash
    # Stable Diffusion: items read from the item cache ('cached'), whose latents came from the index
    # and captions were encoded now ('from_index'), and encoded now by the VAE and text encoder ('encoded')
    items: dict[str, int] | None = None


def unlearn(run: UnlearnRun, progress: Progress | None = None, address: str | None = None, monitor: TrainMonitor | None = None,
            corpus: CorpusIndex | None = None) -> UnlearnResult:
    """Run the unlearn stage on Ray (the current connection, `address`, or a new local instance);
    `corpus`: the corpus's listing and id table when the caller has read them already. Raises InputError
    subclasses for bad input before training, TrainingDivergedError on a non-finite loss (nothing
    saved), UnlearnFailedError when the workers fail beyond the retries."""
    prep = prepare(run, corpus, RayScan(address))
    done = existing_output(prep)
    if done is not None:
        return UnlearnResult(run.output_dir, done, prep.run_name, prep.config_hash, run.spec.train.steps, [], 0.0, prep.plan.kind, skipped=True)
    index = latent_index(prep)  # an index of other latents is refused before the cluster does anything
    ensure_ray(address)
    check_placement(run.spec.scaling)
    storage = _run_storage(prep)
    stopped = storage.check()
    if stopped is not None:
        raise stopped_error(stopped)
    storage.claim(run.spec.request_id)
    datasets, items = build_datasets(prep, index)
    with ProgressRelay(progress) as relay:
        trainer = _trainer(prep, storage, datasets, monitor, relay.callback())
        start = time.perf_counter()
        try:
            result, error = trainer.fit(), None
        except Exception as exc:  # ray.train.TrainingFailedError and friends
            result, error = None, exc
        seconds = time.perf_counter() - start
    _raise_failure(storage, error, run.spec.scaling.max_failures)
    state, digest = _write_output(prep, storage, result.checkpoint)
    return UnlearnResult(
        output_dir=run.output_dir,
        digest=digest,
        run_name=prep.run_name,
        config_hash=prep.config_hash,
        steps=state["step"],
        history=state["history"],
        seconds=seconds,
        model_kind=prep.plan.kind,
        resumed_from=relay.resumed_from(),
        items=items,
    )


def _run_storage(prep: Prepared) -> RunStorage:
    """S3 options are resolved on the driver: workers started before the AWS_* variables were set
    (a local instance, a test) still reach the store."""
    run = prep.run
    s3 = S3Options(endpoint=run.spec.storage.endpoint_url).resolved() if is_s3(run.checkpoint_root) else None
    return RunStorage(run.checkpoint_root, prep.run_name, prep.config_hash, s3)


def _trainer(prep: Prepared, storage: RunStorage, datasets: dict, monitor: TrainMonitor | None, progress_callback) -> TorchTrainer:
    spec = prep.run.spec
    scaling = spec.scaling
    settings = WorkerSettings(
        method=spec.method,
        train=spec.train,
        scaling=scaling,
        plan=prep.plan,
        model_uri=spec.model.uri,
        model_s3=prep.model_s3,
        storage=storage,
        progress=progress_callback.queue,
        report_every=monitor.every if monitor else 0,
        collapse_ratio=monitor.collapse_ratio if monitor else None,
    )
    storage_kwargs = {"storage_path": storage.base, "storage_filesystem": storage.fs} if storage.s3 is not None else {"storage_path": storage.base}
    return TorchTrainer(
        train_loop,
        train_loop_config={SETTINGS_KEY: ray.put(settings)},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=worker_resources(scaling)),
        run_config=RunConfig(
            name=prep.run_name,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=prep.run.keep_checkpoints),
            callbacks=[progress_callback, *(monitor.callbacks if monitor else ())],
            **storage_kwargs,
        ),
        datasets=datasets,
        dataset_config=DATA_CONFIG,
    )


def _raise_failure(storage: RunStorage, error: BaseException | None, max_failures: int) -> None:
    """A stopped run raises what stopped it; a failed one the RetrackError behind it, if any."""
    stopped = storage.stop_marker()
    if stopped is not None:
        raise stopped_error(stopped)
    if error is None:
        return
    cause = unwrap(error)
    if cause is not error:
        raise cause from None
    raise UnlearnFailedError(f"training failed after {max_failures} retries: {error}") from error


def _write_output(prep: Prepared, storage: RunStorage, registered) -> tuple[dict, str]:
    steps = prep.run.spec.train.steps
    saved: dict[str, str] = {}

    def save(directory: str, state: dict) -> None:
        if state["step"] == steps:
            saved["digest"] = save_output(prep, directory, state)

    state = resume(storage, registered, save)
    if state is None or "digest" not in saved:
        got = "no checkpoint" if state is None else f"the last checkpoint at step {state['step']}"
        raise UnlearnFailedError(f"training ended with {got}; {steps} steps were planned")
    return state, saved["digest"]

