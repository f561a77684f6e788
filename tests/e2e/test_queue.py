"""The deletion queue: exactly-once processing when `retrack queue run` invocations overlap.

The overlap tests start two real queue runs (`run_queue` in two processes) at the same moment on
one queue (a local directory, then a real SeaweedFS S3 server). Their runner is `recording_runner`
below, a cheap real job handed to `run_queue`: it logs which request ids each job got and returns
a model version. The first job of each process waits until the other process has a job running
too, so the two runs provably hold claims at the same time. The `retrack queue` CLI is run as a
command, its `run` with `retrack run`'s own jobs.
"""

from __future__ import annotations

import fcntl
import functools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from retrack.errors import InputError
from retrack.queue import CLAIMS, DONE, FAILED, PENDING, DeletionQueue, Lease, LeaseKeeper, run_queue

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ the injected runner


def recording_runner(spec, address, log: str, rendezvous: str | None = None):
    """A cheap real job: log (process, job, forget ids), wait a little, return a model version."""
    if rendezvous:
        d = Path(rendezvous)
        d.mkdir(parents=True, exist_ok=True)
        (d / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(d.iterdir())) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the other queue run never started a job")
            time.sleep(0.05)
    line = json.dumps({"pid": os.getpid(), "job": spec.request_id, "ids": list(spec.forget.ids or [])})
    with open(log, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
    time.sleep(0.2)
    return {"model_version": f"v-{spec.request_id}", "verdict": "forgotten", "report_uri": f"memory://{spec.request_id}", "outcome": "promoted"}


def queue_run(queue_uri: str, log: str, rendezvous: str) -> None:
    """One queue run in its own process, as a scheduled `retrack queue run --max-batch 2` is."""
    summary = run_queue(DeletionQueue(queue_uri), functools.partial(recording_runner, log=log, rendezvous=rendezvous), max_batch=2)
    if summary.failed:
        raise SystemExit(f"failed: {summary.failed}")


# ------------------------------------------------------------------ helpers


def spec_dict(rid: str, ids: list[str], **changes) -> dict:
    d = {
        "request_id": rid,
        "model": {"kind": "pixel-ddpm", "uri": "/models/original"},
        "corpus": {"uri": "/data/corpus"},
        "forget": {"ids": ids},
        "method": {"name": "retrack", "params": {"lambda": 0.5, "k": 10}},
        "storage": {"root": "/data/jobs"},
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "registered_model": "digits-ddpm"},
    }
    d.update(changes)
    return d


def write_spec(tmp: Path, rid: str, ids: list[str], **changes) -> Path:
    path = tmp / f"{rid}.yaml"
    path.write_text(yaml.safe_dump(spec_dict(rid, ids, **changes)))
    return path


def queue_cmd() -> list[str]:
    return [str(Path(sys.executable).with_name("retrack")), "queue"]


def cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra or {})
    return env


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*queue_cmd(), *args], cwd=REPO, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def overlapping_runs(queue_uri: str, tmp: Path, n_requests: int = 8) -> None:
    requests = {f"req-{i:02d}": [f"item-{i}-a", f"item-{i}-b"] for i in range(n_requests)}
    first, *rest = requests.items()
    r = run_cli("submit", str(write_spec(tmp, *first)), "--queue", queue_uri)
    assert r.returncode == 0 and "queued req-00" in r.stdout, r.stderr
    for rid, ids in rest:
        DeletionQueue(queue_uri).submit(write_spec(tmp, rid, ids))
    log = tmp / "jobs.jsonl"
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=queue_run, args=(queue_uri, str(log), str(tmp / "rendezvous"))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"a queue run failed (exit code {p.exitcode})"

    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({j["pid"] for j in jobs}) == 2, f"both runs should have processed requests: {jobs}"
    seen: dict[str, list[str]] = {}
    for j in jobs:
        for rid, ids in requests.items():
            hits = set(ids) & set(j["ids"])
            if hits:
                assert hits == set(ids), f"request {rid} was split across jobs"
                seen.setdefault(rid, []).append(j["job"])
    assert sorted(seen) == sorted(requests), "every request was processed"
    assert all(len(v) == 1 for v in seen.values()), f"a request was processed twice: {seen}"
    assert sum(len(j["ids"]) for j in jobs) == 2 * n_requests

    q = DeletionQueue(queue_uri)
    assert q.pending() == []
    assert q.store.list(CLAIMS) == []
    records = {s.request_id: s.detail for s in q.status() if s.state == "done"}
    assert sorted(records) == sorted(requests)
    for rid, rec in records.items():
        assert rec["model_version"] == f"v-{seen[rid][0]}"
        assert rec["forget_count"] == 2
        text = json.dumps(rec)
        assert not any(i in text for i in requests[rid]), "outcome records hold no forget ids"


# ------------------------------------------------------------------ overlap: two processes


def test_overlapping_runs_process_each_request_once_local(tmp_path):
    overlapping_runs(str(tmp_path / "queue"), tmp_path)


@pytest.mark.integration
def test_overlapping_runs_process_each_request_once_s3(s3_env, tmp_path):
    overlapping_runs(s3_env.uri(f"queue-{uuid.uuid4().hex[:8]}"), tmp_path)


# ------------------------------------------------------------------ claims race (threads, one per run)


def claim_race(queue_uri: str, n_runs: int = 6, n_requests: int = 5) -> None:
    seed = DeletionQueue(queue_uri)
    for i in range(n_requests):
        seed.store.create(f"{PENDING}/r{i}.yaml", yaml.safe_dump(spec_dict(f"r{i}", ["x"])).encode())
    runs = [DeletionQueue(queue_uri) for _ in range(n_runs)]
    barrier = threading.Barrier(n_runs)
    won: dict[str, list[str]] = {f"r{i}": [] for i in range(n_requests)}
    errors = []

    def contend(q: DeletionQueue) -> None:
        try:
            barrier.wait(timeout=60)
            for rid in won:
                if q.claim(rid) is not None:
                    won[rid].append(q.owner)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(q,)) for q in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(len(owners) == 1 for owners in won.values()), won


def test_claim_race_has_one_winner_local(tmp_path):
    claim_race(str(tmp_path / "queue"))


@pytest.mark.integration
def test_claim_race_has_one_winner_s3(s3_env):
    claim_race(s3_env.uri(f"race-{uuid.uuid4().hex[:8]}"))


# ------------------------------------------------------------------ leases


def _recorder():
    calls = []

    def runner(spec, address):
        calls.append((spec.request_id, list(spec.forget.ids)))
        return {"model_version": "3", "verdict": "forgotten", "report_uri": "r", "outcome": "promoted"}

    return calls, runner


def test_expired_claim_is_retaken_and_live_claim_is_left_alone(tmp_path):
    q = DeletionQueue(str(tmp_path / "queue"))
    q.submit(write_spec(tmp_path, "crashed", ["a"]))
    q.submit(write_spec(tmp_path, "busy", ["b"]))
    now = time.time()
    q.store.put(f"{CLAIMS}/crashed.json", Lease("dead-run", "h", 1, now - 2000, now - 100).to_bytes())
    q.store.put(f"{CLAIMS}/busy.json", Lease("live-run", "h", 2, now, now + 600).to_bytes())
    calls, runner = _recorder()
    summary = run_queue(q, runner, log=lambda _m: None)
    assert calls == [("crashed", ["a"])]
    assert [o.request_id for o in summary.outcomes] == ["crashed"] and summary.skipped == ["busy"]
    assert q.pending() == ["busy"]
    lease, _ = q.lease_of("busy")
    assert lease.owner == "live-run"


def test_a_running_claim_is_renewed_and_expires_once_its_run_is_gone(tmp_path):
    q = DeletionQueue(str(tmp_path / "queue"), lease_seconds=1.5)
    q.submit(write_spec(tmp_path, "r1", ["a"]))
    claim = q.claim("r1")
    assert claim is not None
    other = DeletionQueue(str(tmp_path / "queue"), lease_seconds=1.5)
    with LeaseKeeper(q, [claim], log=lambda _m: None):
        time.sleep(4.0)  # over 2.5 leases: only the renewals (every 0.5 s) keep it
        assert other.claim("r1") is None
        assert not claim.lost
    time.sleep(1.8)
    taken = other.claim("r1")
    assert taken is not None and q.lease_of("r1")[0].owner == other.owner
    assert q.renew(claim) is False and claim.lost


def test_a_finished_request_is_not_claimed_again(tmp_path):
    """A run that listed a request before another run finished it must not process it again."""
    q = DeletionQueue(str(tmp_path / "queue"))
    q.submit(write_spec(tmp_path, "r1", ["a"]))
    late = DeletionQueue(str(tmp_path / "queue"))
    assert late.pending() == ["r1"]  # listed now ...
    calls, runner = _recorder()
    run_queue(q, runner, log=lambda _m: None)  # ... finished by another run meanwhile
    assert late.claim("r1") is None
    assert late.store.list(CLAIMS) == []


# ------------------------------------------------------------------ batches, failures, submit


def test_compatible_requests_are_merged_and_others_run_apart(tmp_path):
    q = DeletionQueue(str(tmp_path / "queue"))
    q.submit(write_spec(tmp_path, "r1", ["a", "b"]))
    q.submit(write_spec(tmp_path, "r2", ["b", "c"]))
    q.submit(write_spec(tmp_path, "r3", ["d"], method={"name": "retrack", "params": {"lambda": 0.1, "k": 5}}))
    calls, runner = _recorder()
    summary = run_queue(q, runner, log=lambda _m: None)
    assert len(calls) == 2
    merged = [c for c in calls if c[0].startswith("batch-")]
    assert merged and merged[0][1] == ["a", "b", "c"]
    assert ("r3", ["d"]) in calls
    assert all(o.ok for o in summary.outcomes) and len(summary.outcomes) == 3


def test_a_refused_batch_is_split_so_one_bad_request_fails_alone(tmp_path):
    q = DeletionQueue(str(tmp_path / "queue"))
    for rid, ids in [("good1", ["a"]), ("bad", ["zz"]), ("good2", ["b"])]:
        q.submit(write_spec(tmp_path, rid, ids))

    def runner(spec, address):
        if "zz" in spec.forget.ids:
            raise InputError("1 of 2 forget id(s) are not in the corpus")
        return {"model_version": "5", "verdict": "forgotten", "report_uri": "r", "outcome": "promoted"}

    summary = run_queue(q, runner, log=lambda _m: None)
    ok = {o.request_id: o.ok for o in summary.outcomes}
    assert ok == {"good1": True, "good2": True, "bad": False}
    failed = [s for s in q.status() if s.state == "failed"]
    assert [s.request_id for s in failed] == ["bad"] and "not in the corpus" in failed[0].detail["error"]


def test_requests_whose_version_was_not_promoted_end_failed_with_the_cause(tmp_path):
    """A merged job registers its version but is not promoted: both requests end failed (not
    done), each record says why and names the version, and their specs are kept for a retry."""
    q = DeletionQueue(str(tmp_path / "queue"))
    for rid, ids in (("r1", ["a"]), ("r2", ["b"])):
        q.submit(write_spec(tmp_path, rid, ids))

    def not_forgotten(spec, address):
        return {"model_version": "7", "verdict": "not forgotten", "report_uri": "r", "outcome": "not_forgotten",
                "reasons": ["forget frequency 0.0234 is above 0.1 x the original's 0.0312"]}

    summary = run_queue(q, not_forgotten, log=lambda _m: None)
    assert sorted((o.request_id, o.ok) for o in summary.outcomes) == [("r1", False), ("r2", False)]
    failed = {s.request_id: s.detail for s in q.status() if s.state == "failed"}
    assert sorted(failed) == ["r1", "r2"] and q.store.list(DONE) == []
    for rec in failed.values():
        assert rec["error"] == "not promoted (not_forgotten): forget frequency 0.0234 is above 0.1 x the original's 0.0312"
        assert (rec["model_version"], rec["outcome"], rec["batch_size"]) == ("7", "not_forgotten", 2)
    assert sorted(q.store.list(FAILED)) == ["r1.json", "r1.yaml", "r2.json", "r2.yaml"]


def test_failed_request_is_recorded_and_retry_queues_it_again(tmp_path):
    queue = str(tmp_path / "queue")
    q = DeletionQueue(queue)
    spec = write_spec(tmp_path, "r1", ["a"])
    q.submit(spec)

    def failing(spec, address):
        raise RuntimeError("planned failure")

    summary = run_queue(q, failing, log=lambda _m: None)
    assert [(o.request_id, o.ok) for o in summary.outcomes] == [("r1", False)]
    assert q.pending() == [] and q.store.get(f"{FAILED}/r1.yaml").data == spec.read_bytes()
    lines = [json.loads(x) for x in run_cli("status", "--queue", queue, "--json").stdout.splitlines()]
    assert [(x["request_id"], x["state"], x["error"]) for x in lines] == [("r1", "failed", "RuntimeError: planned failure")]
    with pytest.raises(InputError, match="retry"):
        q.submit(spec)
    r = run_cli("retry", "r1", "--queue", queue)
    assert r.returncode == 0, r.stderr
    assert q.pending() == ["r1"] and q.store.list(FAILED) == []
    run_queue(q, _recorder()[1], log=lambda _m: None)
    lines = [json.loads(x) for x in run_cli("status", "--queue", queue, "--json").stdout.splitlines()]
    assert lines == [{**lines[0], "request_id": "r1", "state": "done", "model_version": "3"}]


def test_cli_run_records_a_job_that_retrack_run_refuses_as_failed(tmp_path):
    """`retrack queue run` runs `retrack run`'s own job: a request whose model is missing is refused
    by that job's preflight (before any Ray work), recorded failed, and the run exits 1."""
    queue = str(tmp_path / "queue")
    spec = write_spec(tmp_path, "r1", ["a"], storage={"root": str(tmp_path / "jobs")},
                      model={"kind": "pixel-ddpm", "uri": str(tmp_path / "no-model")},
                      mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "digits-ddpm"})
    r = run_cli("submit", str(spec), "--queue", queue)
    assert r.returncode == 0, r.stderr
    r = run_cli("run", "--queue", queue)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0 done, 1 failed" in r.stdout and "no-model" in r.stdout, r.stdout
    (failed,) = [s for s in DeletionQueue(queue).status() if s.state == "failed"]
    assert failed.request_id == "r1" and "no-model" in failed.detail["error"]


def test_submit_refuses_invalid_duplicate_and_processed_requests(tmp_path):
    q = DeletionQueue(str(tmp_path / "queue"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec_dict("x", ["a"]), "forget": {"ids": []}}))
    with pytest.raises(InputError, match="forget"):
        q.submit(bad)
    spec = write_spec(tmp_path, "r1", ["a"])
    q.submit(spec)
    with pytest.raises(InputError, match="already queued"):
        q.submit(spec)
    run_queue(q, _recorder()[1], log=lambda _m: None)
    with pytest.raises(InputError, match="already processed"):
        q.submit(spec)
    assert q.store.get(f"{DONE}/r1.json") is not None
