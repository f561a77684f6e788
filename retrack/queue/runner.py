"""A run of the queue: claim the pending requests, run them, record each outcome.

Requests claimed together that agree on everything but their id and forget set (same model,
corpus, method, training, storage and MLflow settings) are merged into one job that forgets the
union of their items: one unlearning run and one new model version for the batch, rather than
versions that each start from the same parent and so forget only their own items. A merged job
that is refused for bad input is split, each request then run alone, so one bad request cannot
sink the others. Runs are keyed by the batch (`batch-<digest of the request ids>`), so a batch
retaken after a crash resumes under the same run name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from retrack.config.spec import JobSpec
from retrack.data.forget import requested_forget_ids
from retrack.digest import ids_digest
from retrack.errors import InputError, RetrackError
from retrack.evaluation.verdict import PROMOTED
from retrack.queue.lease import Claim, LeaseKeeper
from retrack.queue.queue import DeletionQueue, now_iso

# (job spec, Ray address) -> a result with model_version, verdict, report_uri, outcome (and reasons)
Runner = Callable[[JobSpec, "str | None"], Any]


def batch_id(request_ids: list[str]) -> str:
    return "batch-" + hashlib.sha256("\n".join(sorted(request_ids)).encode()).hexdigest()[:16]


def merge_key(spec: JobSpec) -> str:
    """What requests must share to be unlearned in one job: everything but the id and the items. A
    request by picture runs alone: its ids are found by its own job."""
    if spec.forget.images is not None:
        return "picture:" + spec.request_id
    d = spec.model_dump(mode="json")
    d.pop("request_id")
    d["forget"].pop("ids", None)
    d["forget"].pop("file", None)
    return json.dumps(d, sort_keys=True)


def merged_spec(specs: list[JobSpec], ids: dict[str, list[str]]) -> JobSpec:
    """One job for compatible requests: their forget sets' union, named after the batch."""
    if len(specs) == 1:
        return specs[0]
    data = specs[0].model_dump(mode="json")
    data["request_id"] = batch_id([s.request_id for s in specs])
    data["forget"]["ids"] = sorted({i for s in specs for i in ids[s.request_id]})
    data["forget"]["file"] = None
    return JobSpec.model_validate(data)


def result_fields(result: Any) -> dict:
    """model_version, verdict, report_uri and outcome of whatever the runner returned (object or
    mapping), and the reasons when the version was not promoted."""
    get = result.get if isinstance(result, dict) else (lambda k: getattr(result, k, None))
    out = {k: get(k) for k in ("model_version", "verdict", "report_uri", "outcome")}
    out = {k: (None if v is None else str(v)) for k, v in out.items()}
    if out["outcome"] != PROMOTED:
        out["reasons"] = [str(r) for r in get("reasons") or ()]
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class Outcome:
    request_id: str
    ok: bool
    record: dict


@dataclass
class RunSummary:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # pending but claimed by another run

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def run_queue(queue: DeletionQueue, runner: Runner, address: str | None = None, max_batch: int | None = None,
              log: Callable[[str], None] = print) -> RunSummary:
    """Process the requests pending when the run starts: claim up to `max_batch` of them (all by
    default), run each compatible group as one job, record every outcome; repeat until none is
    left to claim. Requests another run holds are left to it."""
    if max_batch is not None and max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    queue.store.check_atomic()
    summary = RunSummary()
    todo = queue.pending()
    log(f"queue {queue.describe()}: {len(todo)} pending request(s)")
    while todo:
        claims: list[Claim] = []
        rest = []
        for rid in todo:
            if max_batch is not None and len(claims) >= max_batch:
                rest.append(rid)
                continue
            claim = queue.claim(rid)
            if claim is not None:
                claims.append(claim)
            elif rid not in summary.skipped:
                summary.skipped.append(rid)
        todo = rest
        if not claims:
            continue
        with LeaseKeeper(queue, claims, log) as keeper:
            try:
                summary.outcomes += _process(queue, claims, runner, address, keeper, log)
            finally:
                for claim in claims:  # anything not completed (an interrupt): free it at once
                    if not claim.completed:
                        with keeper.paused():
                            queue.release(claim)
    summary.skipped = [r for r in summary.skipped if r not in {o.request_id for o in summary.outcomes}]
    return summary


def _process(queue: DeletionQueue, claims: list[Claim], runner: Runner, address: str | None,
             keeper: LeaseKeeper, log: Callable[[str], None]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    started = now_iso()

    def finish(claim: Claim, ok: bool, record: dict, text: bytes | None) -> None:
        with keeper.paused():
            queue.complete(claim, {"claimed_at": started, **record}, ok, spec_text=text)
            claim.completed = True
        outcomes.append(Outcome(claim.request_id, ok, record))
        if ok:
            log(f"done    {claim.request_id}: model version {record.get('model_version')}, verdict {record.get('verdict')} (job {record.get('job_request_id')})")
        else:
            log(f"failed  {claim.request_id}: {record.get('error')}")

    # Read every claimed request; one that cannot be read fails alone, before any job runs.
    ready: list[tuple[Claim, bytes, JobSpec, list[str]]] = []
    for claim in claims:
        text = None
        try:
            text, spec = queue.spec_of(claim.request_id)
            ids = requested_forget_ids(spec)
            if not ids and spec.forget.images is None:
                raise InputError("the forget set is empty: nothing to unlearn")
            ready.append((claim, text, spec, ids))
        except RetrackError as exc:
            finish(claim, False, {"error": _first_line(exc)}, text)

    groups: dict[str, list[tuple[Claim, bytes, JobSpec, list[str]]]] = {}
    for item in ready:
        groups.setdefault(merge_key(item[2]), []).append(item)

    def run_group(items: list[tuple[Claim, bytes, JobSpec, list[str]]]) -> None:
        specs = [s for _, _, s, _ in items]
        ids = {s.request_id: i for _, _, s, i in items}
        job = merged_spec(specs, ids)
        log(f"running {job.request_id} for {len(items)} request(s): {', '.join(s.request_id for s in specs)}")
        try:
            result = runner(job, address)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded against its requests
            if len(items) > 1 and isinstance(exc, InputError):
                log(f"job {job.request_id} refused its input ({_first_line(exc)}); running its requests one by one")
                for item in items:
                    run_group([item])
                return
            for claim, text, spec, _ in items:
                finish(claim, False, {"error": _first_line(exc), "job_request_id": job.request_id, "batch_size": len(items)}, text)
            return
        fields = result_fields(result)
        promoted = fields["outcome"] == PROMOTED
        if not promoted:  # registered but not promoted: the request failed, and says why
            fields["error"] = f"not promoted ({fields['outcome']}): " + ("; ".join(fields["reasons"]) or "no reason given")
        for claim, text, spec, i in items:
            forget = {"forget_count": len(i), "forget_ids_digest": ids_digest(i)} if i else {"forget_images": len(spec.forget.images)}
            finish(claim, promoted, {**fields, "job_request_id": job.request_id, "batch_size": len(items), **forget}, None if promoted else text)

    for items in groups.values():
        run_group(items)
    return outcomes
