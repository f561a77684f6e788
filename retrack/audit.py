"""The audit trail: one record per attempt to carry out a deletion request, in storage and MLflow.

A record says who asked to forget what (the forget ids only as a digest and a count), which model
it came from and which version it produced, when it started and finished, which stages ran or were
skipped (a rerun skips finished ones), the key metrics, the verdict, the promotion outcome, the
config hash and the code version. A failed attempt is recorded too, with the error's class only (a
message may name data); so is an attempt whose version was registered but not promoted (not
forgotten, or below the quality gate): status "failed", its `outcome` and `reasons` say why.

Storage: `<storage root>/audit/<request id>/<attempt>.json`, one file per attempt, each written
atomically by the one job that owns it, so reruns and concurrent jobs never overwrite each other's
history; attempt names sort by start time. MLflow: the request's run gets the record as the
artifact `audit/<attempt>.json` and the tags `retrack.audit.*`; the model version gets
`retrack.verdict` and `retrack.audit.record`. A version's lineage is its parent chain
(`retrack.parent_model_version`), so `trace_version` lists every request the version reflects.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

from retrack.errors import InputError, StorageError
from retrack.storage.location import Location

if TYPE_CHECKING:
    from retrack.config.spec import JobSpec

FORMAT = 1
AUDIT_DIR = "audit"
TAG = "retrack."


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class AuditRecord:
    request_id: str
    attempt: str
    status: str  # running | succeeded (promoted) | failed (an error, or not promoted); a killed job stays "running"
    config_hash: str
    code_version: str
    started_at: str
    requested_forget: dict  # digest, count: the forget set as the request listed it
    parent_model: dict  # uri, version, registered_model
    method: dict  # name, params
    finished_at: str | None = None
    forget: dict | None = None  # digest, count, duplicates_added: what was actually forgotten
    model: dict | None = None  # registered_model, version, run_id, digest
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    verdict: str | None = None
    outcome: str | None = None  # promoted | not_forgotten | quality_gate (retrack.evaluation.verdict)
    reasons: list[str] = field(default_factory=list)  # why not promoted: numbers and ceilings only
    error: str | None = None  # exception class name, never its message
    format: int = FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AuditRecord":
        if d.get("format") != FORMAT:
            raise StorageError(f"audit record format {d.get('format')} is not {FORMAT}")
        return cls(**d)


class AuditLog:
    """The audit records under one storage root."""

    def __init__(self, root: str | Location, endpoint: str | None = None):
        self.root = Location.parse(root, endpoint=endpoint) / AUDIT_DIR

    def request_dir(self, request_id: str) -> Location:
        from retrack.config.spec import check_safe_name

        try:  # the id becomes a path component: the same alphabet as the spec's request_id
            check_safe_name(request_id, "request id")
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return self.root / request_id

    def write(self, record: AuditRecord) -> Location:
        loc = self.request_dir(record.request_id) / f"{record.attempt}.json"
        loc.write_json(record.to_dict())
        return loc

    def attempts(self, request_id: str) -> list[AuditRecord]:
        """Every attempt at a request, oldest first; InputError when there is none."""
        entries = self.request_dir(request_id).list(suffixes=(".json",), recursive=False)
        if not entries:
            raise InputError(f"no audit record for request {request_id!r} under {self.root.uri}")
        return sorted((AuditRecord.from_dict(e.location.read_json()) for e in entries), key=lambda r: (r.started_at, r.attempt))

    def request_ids(self) -> list[str]:
        return sorted({e.location.relative_to(self.root).split("/")[0] for e in self.root.list(suffixes=(".json",))})


def summarize(attempts: list[AuditRecord]) -> dict:
    """One request's state: its latest attempt (the latest succeeded one, when there is one) and
    the history of every attempt."""
    done = [a for a in attempts if a.status == "succeeded"]
    latest = (done or attempts)[-1]
    return {
        **latest.to_dict(),
        "first_started_at": attempts[0].started_at,
        "attempts": [{k: getattr(a, k) for k in ("attempt", "status", "config_hash", "started_at", "finished_at", "stages_run", "stages_skipped", "outcome", "error")}
                     for a in attempts],
    }


def _attempt_name(config_hash: str) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{config_hash}-{uuid.uuid4().hex[:8]}"


class AuditAttempt:
    """The record of the running attempt; `succeeded` completes it, an exception fails it."""

    def __init__(self, spec: "JobSpec", log: AuditLog, record: AuditRecord, ran: list[str], skipped: list[str]):
        self.spec, self.log, self.record = spec, log, record
        self._ran, self._skipped = ran, skipped
        self.location = log.write(record)

    def _stages(self) -> None:
        self.record.stages_run, self.record.stages_skipped = list(self._ran), list(self._skipped)

    def failed(self, exc: BaseException) -> None:
        self._stages()
        self.record.status, self.record.error, self.record.finished_at = "failed", type(exc).__name__, now()
        self.log.write(self.record)

    def finished(self, nb: dict, un: dict, ev: dict, reg: dict) -> AuditRecord:
        """Complete the record in storage (succeeded if the version was promoted, else failed with
        the outcome), then attach it to the MLflow run and model version."""
        r = self.record
        self._stages()
        r.forget = {"digest": nb["forget_ids_digest"], "count": nb["forget_count"], "duplicates_added": nb.get("duplicates_added", 0)}
        r.model = {"registered_model": reg["registered_model"], "version": str(reg["model_version"]), "run_id": reg["run_id"], "digest": un.get("model_digest")}
        r.metrics = flat_metrics(ev["metrics"]) | {"unlearn.wall_seconds": un.get("wall_seconds")}
        r.verdict, r.outcome, r.reasons = ev["verdict"], reg["outcome"], list(reg["reasons"])
        r.status, r.finished_at = "succeeded" if reg["promoted"] else "failed", now()
        self.log.write(r)
        log_to_mlflow(self.spec.mlflow.tracking_uri, r, self.location.uri, self.spec.storage.endpoint_url)
        return r


def flat_metrics(metrics: dict) -> dict[str, float]:
    """{model: {name: value}} -> {"model.name": value}, the keys the MLflow run logs."""
    return {f"{m}.{k}": v for m, vals in metrics.items() for k, v in vals.items()}


@contextmanager
def audit_attempt(spec: "JobSpec", requested_forget: dict, ran: list[str], skipped: list[str]) -> Iterator[AuditAttempt]:
    """Record an attempt at `spec`'s request: "running" now, "failed" (error class only) if the body
    raises. `requested_forget` holds digests and counts only; `ran` / `skipped` are the job's own
    stage lists, read when the attempt ends."""
    from retrack.lineage.store import code_version

    record = AuditRecord(
        request_id=spec.request_id,
        attempt=_attempt_name(spec.config_hash()),
        status="running",
        config_hash=spec.config_hash(),
        code_version=code_version(),
        started_at=now(),
        requested_forget=requested_forget,
        parent_model={"uri": spec.model.uri, "version": spec.model.version, "registered_model": spec.model.registered_name or spec.mlflow.registered_model},
        method={"name": spec.method.name, "params": spec.method.params},
    )
    attempt = AuditAttempt(spec, AuditLog(spec.storage.root, spec.storage.endpoint_url), record, ran, skipped)
    try:
        yield attempt
    except BaseException as exc:
        if attempt.record.outcome is None:  # not finished: the exception failed the attempt
            try:
                attempt.failed(exc)
            except Exception:  # the storage fault that failed the job may fail this write too
                pass
        raise


# --- MLflow ---------------------------------------------------------------------------------


def log_to_mlflow(tracking_uri: str, record: AuditRecord, record_uri: str, endpoint_url: str | None = None) -> None:
    """The record as the run's artifact `audit/<attempt>.json` plus tags on the run and version."""
    from retrack.lineage.store import LineageStore, mlflow_env_for_storage

    mlflow_env_for_storage(endpoint_url)
    store = LineageStore(tracking_uri)
    m = record.model or {}
    run_id = m["run_id"]
    store.call("log audit record", lambda: store.client.log_dict(run_id, record.to_dict(), f"{AUDIT_DIR}/{record.attempt}.json"))
    for k, v in {"audit.status": record.status, "audit.attempt": record.attempt, "audit.record": record_uri, "verdict": record.verdict,
                 "outcome": record.outcome}.items():
        store.call("tag run", lambda k=k, v=v: store.client.set_tag(run_id, TAG + k, str(v)))
    for k, v in {"verdict": record.verdict, "audit.record": record_uri}.items():
        store.call("tag version", lambda k=k, v=v: store.client.set_model_version_tag(m["registered_model"], m["version"], TAG + k, str(v)))


def _check_model_name(name: str) -> str:
    if not name or "'" in name or "\\" in name:
        raise InputError(f"registered model name {name!r} is empty or contains a quote or backslash")
    return name


def _version_row(mv) -> dict:
    t = mv.tags
    return {
        "version": str(mv.version),
        "request_id": t.get(TAG + "request_id"),
        "parent_model_uri": t.get(TAG + "parent_model_uri"),
        "parent_model_version": t.get(TAG + "parent_model_version") or None,
        "forget_ids_digest": t.get(TAG + "forget_ids_digest"),
        "forget_count": int(t[TAG + "forget_count"]) if TAG + "forget_count" in t else None,
        "config_hash": t.get(TAG + "config_hash"),
        "verdict": t.get(TAG + "verdict"),
        "outcome": t.get(TAG + "outcome"),
        "gate": t.get(TAG + "gate"),
        "complete": t.get(TAG + "complete") == "true",
        "run_id": mv.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mv.creation_timestamp / 1000)) if mv.creation_timestamp else None,
    }


def requests_of_model(client, name: str) -> list[dict]:
    """Every version of `name` that retrack registered (one per deletion request), oldest first."""
    versions = client.search_model_versions(f"name = '{_check_model_name(name)}'")
    rows = [_version_row(mv) for mv in versions if TAG + "request_id" in mv.tags]
    return sorted(rows, key=lambda r: int(r["version"]) if r["version"].isdigit() else r["version"])


def trace_version(client, name: str, version: str) -> list[dict]:
    """The version and its ancestors, newest first, following `retrack.parent_model_version`:
    every request the version reflects is one entry. The chain ends at a version retrack did not
    register (the original model) or at a parent the registry does not hold (`missing`)."""
    from mlflow.exceptions import MlflowException

    _check_model_name(name)
    chain: list[dict] = []
    seen: set[str] = set()
    current: str | None = str(version)
    while current and current not in seen:
        seen.add(current)
        try:
            mv = client.get_model_version(name, current)
        except MlflowException:
            if not chain:
                raise InputError(f"registered model {name!r} has no version {current!r}") from None
            chain.append({"version": current, "missing": True})
            break
        row = _version_row(mv)
        chain.append(row)
        current = row["parent_model_version"] if row["request_id"] else None
    return chain


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
