"""Ray Tune callbacks of the tuning driver."""

from __future__ import annotations

from ray import tune

from pipelines.progress import StageProgress, console
from pipelines.tune.trial import outcome, trial_key
from retrack.tuning.search import OBJECTIVES


class TrialRuns(tune.Callback):
    """Each finished trial as an MLflow child run of the tuning run: its parameters, objectives
    and status (Ray's MLflow callback would not nest them). Runs in the driver process (one writer
    for the store); the client is made on first use so the experiment state Tune saves for a
    restore stays picklable."""

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


class TrialProgress(tune.Callback):
    """The finished trials as the `tune` stage's progress. Runs in the driver process; its display
    is made when the experiment (re)starts, so the state Tune saves for a restore stays picklable."""

    def __init__(self):
        self.total = 0
        self._progress: StageProgress | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_progress": None}

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples or num_samples or 0
        self._progress = StageProgress("tune")
        self._progress.start()

    def on_step_end(self, iteration, trials, **info):
        self._report(trials)

    def on_experiment_end(self, trials, **info):
        self._report(trials)
        self._progress.close()

    def _report(self, trials) -> None:
        done = sum(t.status in (t.TERMINATED, t.ERROR) for t in trials)
        self._progress("trials", done, max(self.total, len(trials)))
