"""MLflow lineage of a deletion request: one run per request, the unlearned model registered as a
new version with its lineage tags, and the alias moved last.

Idempotent and safe against partial failure: a version is only "complete" once it carries the
`retrack.complete` tag, which is set after everything else; the alias moves after that. A rerun of
the same request (same request id and config hash) finds the complete version and reuses it; a
version left incomplete by a crash is deleted and registered again. Every version is registered;
one whose `retrack.outcome` tag says it was not promoted (not forgotten, or below the quality
gate) never takes the alias, not even from another job's move.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TypeVar

from retrack.errors import StorageError, TrackingError, redact
from retrack.evaluation.verdict import PROMOTED

TAG_PREFIX = "retrack."
COMPLETE_TAG = TAG_PREFIX + "complete"
OUTCOME_TAG = TAG_PREFIX + "outcome"
T = TypeVar("T")

# MLflow's error codes (`MlflowException.error_code`) that the calls below branch on. A failed
# connection reaches the client as INTERNAL_ERROR, or as a requests error where MLflow lets it through.
TRANSIENT = ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED")
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
# A missing alias: INVALID_PARAMETER_VALUE from MLflow's SQL registry.
NO_ALIAS = (DOES_NOT_EXIST, "INVALID_PARAMETER_VALUE")
# MLflow's SQL store reports a write that lost a race on a unique key (its read-then-insert upsert of
# an alias or a registered-model tag) as BAD_REQUEST: the SQLAlchemy IntegrityError it wraps.
LOST_RACE = "BAD_REQUEST"


def code_version() -> str:
    """Package version plus the git commit of the checkout it runs from, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("retrack")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pkg}+{sha}" if sha else pkg


@dataclass(frozen=True)
class Lineage:
    """What a registered version must say about where it came from. Ids appear only as a digest."""

    request_id: str
    config_hash: str
    parent_model_uri: str
    parent_model_version: str
    forget_ids_digest: str
    forget_count: int
    index_manifest_digest: str
    method: str
    method_params: str  # JSON
    code_version: str
    model_digest: str

    def tags(self) -> dict[str, str]:
        return {TAG_PREFIX + k: str(v) for k, v in asdict(self).items()}


def with_retries(fn: Callable[[], T], what: str, endpoint: str, attempts: int = 4, backoff: float = 1.0) -> T:
    """Bounded retries with exponential backoff for transient tracking-server failures. A failure
    becomes a TrackingError that keeps MLflow's error code (None: the server was not reached)."""
    import requests
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn()
        except (MlflowException, requests.exceptions.RequestException, ConnectionError) as exc:
            code = exc.error_code if isinstance(exc, MlflowException) else None
            if (code is not None and code not in TRANSIENT) or attempt == attempts - 1:
                message = f"MLflow at {endpoint}: {what} failed after {attempt + 1} attempt(s): {_short(exc)}"
                raise TrackingError(redact(message), mlflow_code=code) from None
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def check_tracking_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking server cannot be reached."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.exceptions.RequestException as exc:
        raise StorageError(redact(f"MLflow tracking server {tracking_uri} is unreachable: {_short(exc)}")) from None


class LineageStore:
    """The MLflow side of one request: run, inputs, metrics, artifacts, model version, alias."""

    def __init__(self, tracking_uri: str, attempts: int = 4, backoff: float = 1.0):
        from mlflow import MlflowClient

        # MLflow's own HTTP layer retries 7 times with backoff capped at 120 s (minutes per call,
        # and `with_retries` multiplies that); retries and backoff are bounded here instead. An
        # operator's explicit setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.attempts, self.backoff = attempts, backoff

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` with MLflow failures retried (bounded) and raised as TrackingError."""
        return with_retries(fn, what, self.tracking_uri, self.attempts, self.backoff)

    # --- run ---------------------------------------------------------------------------------

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        exp = self.call("get experiment", lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            return exp.experiment_id
        try:
            return self.call("create experiment", lambda: self.client.create_experiment(name, artifact_location=artifact_location))
        except TrackingError as exc:
            if exc.mlflow_code != ALREADY_EXISTS:
                raise
            # Another job created it between our read and our create.
            return self.call("get experiment", lambda: self.client.get_experiment_by_name(name)).experiment_id

    def request_run(self, experiment: str, run_name: str, request_id: str, config_hash: str, artifact_location: str | None = None) -> str:
        """The run of this (request, config): reused on rerun, created otherwise."""
        exp_id = self.experiment_id(experiment, artifact_location)
        found = self._find_run(exp_id, f"tags.`{TAG_PREFIX}request_id` = '{request_id}' and tags.`{TAG_PREFIX}config_hash` = '{config_hash}'")
        if found:
            return found
        run = self.call(
            "create run",
            lambda: self.client.create_run(exp_id, run_name=run_name, tags={TAG_PREFIX + "request_id": request_id, TAG_PREFIX + "config_hash": config_hash}),
        )
        return run.info.run_id

    def _find_run(self, exp_id: str, filter_string: str) -> str | None:
        found = self.call("search runs", lambda: self.client.search_runs([exp_id], filter_string=filter_string, max_results=1))
        return found[0].info.run_id if found else None

    def child_run(self, parent_run_id: str, run_name: str, key: str) -> str:
        """A run nested under `parent_run_id` (MLflow's parentRunId tag), found again by `key` on rerun."""
        parent = self.call("get run", lambda: self.client.get_run(parent_run_id))
        exp_id = parent.info.experiment_id
        found = self._find_run(exp_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG_PREFIX}child` = '{key}'")
        if found:
            return found
        tags = {"mlflow.parentRunId": parent_run_id, TAG_PREFIX + "child": key, TAG_PREFIX + "request_id": parent.data.tags.get(TAG_PREFIX + "request_id", "")}
        return self.call("create run", lambda: self.client.create_run(exp_id, run_name=run_name, tags=tags)).info.run_id

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        from mlflow.entities import Param

        existing = self.call("get run", lambda: self.client.get_run(run_id)).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        if todo:
            self.call("log params", lambda: self.client.log_batch(run_id, params=todo))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.call("log metrics", lambda: self.client.log_batch(run_id, metrics=batch))

    def log_inputs(self, run_id: str, inputs: dict[str, tuple[str, str, int]]) -> None:
        """`inputs[context] = (source uri, digest, count)`: datasets logged as digests and counts only."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        entries = []
        for context, (source, digest, count) in inputs.items():
            ds = MetaDataset(source=HTTPDatasetSource(source), name=context, digest=digest[:32])
            tags = [InputTag("mlflow.data.context", context), InputTag(TAG_PREFIX + "count", str(count))]
            entries.append(DatasetInput(ds._to_mlflow_entity(), tags))
        self.call("log inputs", lambda: self.client.log_inputs(run_id, datasets=entries))

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
        self.call("upload artifacts", lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.call("end run", lambda: self.client.set_terminated(run_id, status=status))

    # --- registry ----------------------------------------------------------------------------

    def complete_version(self, name: str, lineage: Lineage):
        """The complete version registered for this (request, config), if any."""
        for mv in self._versions_of(name, lineage):
            if mv.tags.get(COMPLETE_TAG) == "true":
                return mv
        return None

    def _versions_of(self, name: str, lineage: Lineage) -> list:
        try:
            versions = self.call("search versions", lambda: self.client.search_model_versions(f"name = '{name}'"))
        except TrackingError as exc:
            if exc.mlflow_code == DOES_NOT_EXIST:
                return []
            raise
        want = (lineage.request_id, lineage.config_hash)
        return [mv for mv in versions if (mv.tags.get(TAG_PREFIX + "request_id"), mv.tags.get(TAG_PREFIX + "config_hash")) == want]

    def register(self, name: str, run_id: str, model_dir: str | Path, lineage: Lineage, alias: str | None,
                 tags: dict[str, str] | None = None) -> str:
        """Register `model_dir` as a new version of `name` (or reuse this request's) with the lineage
        tags and `tags` (under `retrack.`), then move `alias` (None: move none)."""
        done = self.complete_version(name, lineage)
        if done is None:
            for stale in self._versions_of(name, lineage):  # left incomplete by a crash
                self.call("delete incomplete version", lambda v=stale: self.client.delete_model_version(name, v.version))
            self.log_artifacts(run_id, model_dir, "model")
            try:
                self.call("create registered model", lambda: self.client.create_registered_model(name))
            except TrackingError as exc:
                if exc.mlflow_code != ALREADY_EXISTS:
                    raise
            source = self.call("get run", lambda: self.client.get_run(run_id)).info.artifact_uri.rstrip("/") + "/model"
            mv = self.call(
                "create model version",
                lambda: self.client.create_model_version(name, source=source, run_id=run_id, description=f"retrack unlearning for request {lineage.request_id}",
                                                         tags=lineage.tags() | {TAG_PREFIX + k: v for k, v in (tags or {}).items()}),
            )
            self._wait_ready(name, mv.version)
            self.call("tag version complete", lambda: self.client.set_model_version_tag(name, mv.version, COMPLETE_TAG, "true"))
            version = mv.version
        else:
            version = done.version
        if alias:
            self.move_alias(name, alias, str(version), lineage.request_id)
        return str(version)

    def move_alias(self, name: str, alias: str, version: str, request_id: str, rounds: int = 10) -> str:
        """Point `alias` at the highest complete version (never backwards); returns where it ends.

        Two jobs for the same model can interleave: A reads, B moves the alias to its newer version,
        then A's write lands. So this is a compare-and-set loop: read the alias and every complete
        version, write the highest, read again, until a read agrees. Each job reads only after its
        own version is tagged complete, so the last job to finish sees every complete version and
        the alias ends on the highest whatever the interleaving. A version tagged with an outcome
        other than "promoted" is never a target (versions from before the gate carry no outcome:
        each of them was promoted). Each move is recorded as the registered model's tag
        `retrack.alias.<alias>` (version, request id, time).
        """
        import json

        for _ in range(rounds):
            current = self.alias_version(name, alias)
            complete = [mv.version for mv in self.call("search versions", lambda: self.client.search_model_versions(f"name = '{name}'"))
                        if mv.tags.get(COMPLETE_TAG) == "true" and mv.tags.get(OUTCOME_TAG, PROMOTED) == PROMOTED]
            target = str(max(int(v) for v in [*complete, version, *([current] if current else [])]))
            if current == target:
                return target
            if not self._write_unless_raced("move alias", lambda: self.client.set_registered_model_alias(name, alias, target)):
                continue
            record = json.dumps({"version": target, "request_id": request_id, "time": time.time()})
            # The record is an upsert too: after a lost race the other writer's row exists, so the
            # next attempt updates it.
            tag = f"{TAG_PREFIX}alias.{alias}"
            if not any(self._write_unless_raced("record alias move", lambda: self.client.set_registered_model_tag(name, tag, record)) for _ in range(3)):
                raise StorageError(f"the record of alias {alias!r} of {name} lost 3 write races in a row")
        raise StorageError(f"alias {alias!r} of {name} kept changing under {rounds} rounds of compare-and-set")

    def _write_unless_raced(self, what: str, fn: Callable[[], object]) -> bool:
        """Run a registry write; False when it lost a race to a concurrent writer of the same row.

        MLflow's SQL store writes aliases and registered-model tags by read-then-insert: two writers
        at once make one fail on the table's unique key. The loser backs off a random moment (so
        threads of one process do not collide again) and the caller reads again or retries.
        """
        try:
            self.call(what, fn)
            return True
        except TrackingError as exc:
            if exc.mlflow_code != LOST_RACE:
                raise
            time.sleep(random.uniform(0.05, 0.3))
            return False

    def alias_version(self, name: str, alias: str) -> str | None:
        try:
            return str(self.call("read alias", lambda: self.client.get_model_version_by_alias(name, alias)).version)
        except TrackingError as exc:
            if exc.mlflow_code in NO_ALIAS:
                return None
            raise

    def _wait_ready(self, name: str, version: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            mv = self.call("get version", lambda: self.client.get_model_version(name, version))
            if mv.status == "READY":
                return
            if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise StorageError(f"model version {name}/{version} did not become READY (status {mv.status})")
            time.sleep(0.5)


def mlflow_env_for_storage(endpoint_url: str | None) -> None:
    """Point MLflow's S3 artifact client at an S3-compatible endpoint (credentials from the env)."""
    if endpoint_url:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint_url)
