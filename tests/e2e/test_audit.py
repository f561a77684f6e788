"""The audit trail of deletion requests (storage + MLflow, `retrack audit`), and the privacy scan
over everything a real job writes: storage root, MLflow run/version/artifacts, logs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from retrack.audit import AuditLog, audit_attempt, trace_version
from retrack.digest import ids_digest
from retrack.errors import StorageError
from retrack.evaluation.verdict import NOT_FORGOTTEN, PROMOTED, Promotion
from retrack.lineage.store import Lineage, LineageStore
from retrack.config.spec import JobSpec

FORGET = ["img-000007", "img-000011"]
REQUESTED = {"digest": ids_digest(FORGET), "count": len(FORGET)}  # what preflight hands the audit


def spec_for(tmp: Path, request_id: str, parent_version: str | None, **over) -> JobSpec:
    data = {
        "request_id": request_id,
        "model": {"kind": "pixel-ddpm", "uri": str(tmp / "models" / "parent"), "version": parent_version},
        "corpus": {"uri": str(tmp / "corpus")},
        "forget": {"ids": FORGET},
        "storage": {"root": str(tmp / "jobs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "registered_model": "audited", "artifact_location": (tmp / "art").as_uri()},
        **over,
    }
    return JobSpec.model_validate(data)


def register(spec: JobSpec, model_dir: Path) -> dict:
    """What the job's register stage returns, done for real against the spec's MLflow store."""
    store = LineageStore(spec.mlflow.tracking_uri)
    lin = Lineage(spec.request_id, spec.config_hash(), spec.model.uri, spec.model.version or "", ids_digest(FORGET), len(FORGET),
                  "e" * 64, spec.method.name, "{}", "test", "d" * 64)
    run_id = store.request_run(spec.mlflow.experiment, spec.run_name, spec.request_id, spec.config_hash(), spec.mlflow.artifact_location)
    version = store.register(spec.mlflow.registered_model, run_id, model_dir, lin, alias=None)
    store.finish_run(run_id)
    return {"model_version": version, "registered_model": spec.mlflow.registered_model, "run_id": run_id}


def finish(spec: JobSpec, model_dir: Path, ran: list[str], decision: Promotion = Promotion(PROMOTED, [], [])) -> None:
    with audit_attempt(spec, REQUESTED, ran, []) as a:
        ran += ["index", "neighbours", "unlearn", "evaluate", "register"]
        reg = register(spec, model_dir) | decision.to_dict()
        verdict = "not forgotten" if decision.outcome == NOT_FORGOTTEN else "forgotten"
        a.finished({"forget_ids_digest": ids_digest(FORGET), "forget_count": 2, "duplicates_added": 0},
                   {"model_digest": "d" * 64, "wall_seconds": 1.5},
                   {"verdict": verdict, "metrics": {"unlearned": {"forget_frequency": 0.0, "fid": 12.5}}}, reg)


def test_records_chain_and_cli(tmp_path, model_dir):
    """Three requests against one model, each from the previous version, plus one that failed:
    every attempt is recorded, the versions trace back through their parents to all requests,
    and the failed one keeps only the error's class."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("audited")
    original = str(client.create_model_version("audited", source=str(model_dir)).version)  # registered by training, not retrack
    parent = original
    for rid in ("req-a", "req-b", "req-c"):
        spec = spec_for(tmp_path, rid, parent)
        finish(spec, model_dir, [])
        parent = AuditLog(spec.storage.root).attempts(rid)[-1].model["version"]
    failing = spec_for(tmp_path, "req-d", parent)
    with pytest.raises(StorageError):
        with audit_attempt(failing, REQUESTED, ["index"], []):
            raise StorageError(f"cannot write {FORGET[0]}")  # a message that names data
    # A version registered but not promoted: the attempt failed, with its outcome and reasons.
    finish(spec_for(tmp_path, "req-e", parent), model_dir, [], Promotion(NOT_FORGOTTEN, [], ["forget frequency 0.02 is above 0.1 x the original's 0.03"]))

    log = AuditLog(tmp_path / "jobs")
    assert log.request_ids() == ["req-a", "req-b", "req-c", "req-d", "req-e"]
    c = log.attempts("req-c")[-1]
    assert (c.status, c.verdict, c.parent_model["version"], c.stages_run) == ("succeeded", "forgotten", str(int(original) + 2), ["index", "neighbours", "unlearn", "evaluate", "register"])
    assert c.forget == {"digest": ids_digest(FORGET), "count": 2, "duplicates_added": 0} and c.metrics["unlearned.fid"] == 12.5
    assert c.started_at <= c.finished_at and c.config_hash and c.code_version
    d = log.attempts("req-d")[-1]
    assert (d.status, d.error, d.stages_run, d.model, d.outcome) == ("failed", "StorageError", ["index"], None, None)
    e = log.attempts("req-e")[-1]
    assert (e.status, e.error, e.verdict, e.outcome, e.model["version"]) == ("failed", None, "not forgotten", "not_forgotten", str(int(parent) + 1))
    assert c.outcome == "promoted" and e.reasons == ["forget frequency 0.02 is above 0.1 x the original's 0.03"]
    for f in (tmp_path / "jobs" / "audit").rglob("*.json"):
        assert not any(i in f.read_text() for i in FORGET), f  # ids only as a digest, never the message

    # MLflow: the record is the run's artifact, the verdict a tag of run and version.
    mv = client.get_model_version("audited", c.model["version"])
    assert mv.tags["retrack.verdict"] == "forgotten" and mv.tags["retrack.audit.record"].endswith(f"{c.attempt}.json")
    art = json.loads(Path(client.download_artifacts(c.model["run_id"], f"audit/{c.attempt}.json", str(tmp_path / "dl"))).read_text())
    assert art == c.to_dict()

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    chain = trace_version(client, "audited", c.model["version"])
    assert [r["request_id"] for r in chain] == ["req-c", "req-b", "req-a", None]
    assert chain[-1]["version"] == original

    runner = CliRunner()
    out = runner.invoke(app, ["audit", "--model", "audited", "--tracking-uri", db, "--version", c.model["version"], "--json"])
    assert out.exit_code == 0, out.output
    assert [r["request_id"] for r in json.loads(out.output)] == ["req-c", "req-b", "req-a", None]
    text = runner.invoke(app, ["audit", "--model", "audited", "--tracking-uri", db, "--version", c.model["version"]]).output
    assert "reflects 3 deletion request(s)" in text and "not registered by retrack" in text
    listed = runner.invoke(app, ["audit", "--model", "audited", "--tracking-uri", db, "--root", str(tmp_path / "jobs"), "--json"])
    rows = json.loads(listed.output)
    assert [(r["request_id"], r["version"]) for r in rows][:3] == [("req-a", str(int(original) + 1)), ("req-b", str(int(original) + 2)), ("req-c", str(int(original) + 3))]
    assert rows[3]["request_id"] == "req-e" and rows[3]["version"] == e.model["version"]
    assert rows[4]["request_id"] == "req-d" and rows[4]["status"] == "failed" and rows[4]["version"] is None
    shown = runner.invoke(app, ["audit", "req-d", "--root", str(tmp_path / "jobs")])
    assert shown.exit_code == 0 and "request req-d: failed (StorageError)" in shown.output
    shown = runner.invoke(app, ["audit", "req-e", "--root", str(tmp_path / "jobs")]).output
    assert "request req-e: failed" in shown and "outcome: not_forgotten" in shown and "above 0.1 x the original's" in shown
    missing = runner.invoke(app, ["audit", "req-zzz", "--root", str(tmp_path / "jobs")])
    assert missing.exit_code == 2 and "no audit record for request 'req-zzz'" in missing.output


# --- a real job: audit hook and privacy scan ------------------------------------------------


@pytest.fixture(scope="module")
def captioned(small, tmp_path_factory):
    """The small benchmark with a caption on every item, and its original model."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("captioned")
    shutil.copytree(small / "bench", root / "bench")
    for shard in sorted((root / "bench" / "corpus").glob("*.parquet")):
        t = pq.read_table(shard)
        rows = [{**r, "caption": f"private caption for {r['id']}: a handwritten {r['label']}"} for r in t.to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), shard)
    shutil.copytree(small / "original", root / "original")
    return root


@pytest.mark.slow
@pytest.mark.integration
def test_real_job_audit_and_privacy_scan_of_everything_it_wrote(captioned, tmp_path, monkeypatch, capfd):
    from mlflow import MlflowClient

    from pipelines.job import run_job
    from retrack.data.corpus import decode_image, iter_rows
    from retrack.data.forget import read_forget_ids
    from retrack.privacy import ForgetContent, mlflow_blobs, scan_location
    from retrack.storage.location import Location

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    root = captioned
    data = {
        "request_id": "req-audit",
        "model": {"kind": "pixel-ddpm", "uri": str(root / "original"), "version": "1"},
        "corpus": {"uri": str(root / "bench" / "corpus")},
        "forget": {"file": str(root / "bench" / "forget_ids.txt"), "duplicates": "add"},
        "method": {"name": "retrack", "params": {"lambda": 0.5, "k": 4}},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 1},
        "evaluation": {"num_samples": 32, "holdout_uri": str(root / "bench" / "holdout")},
        "storage": {"root": str(tmp_path / "jobs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "audit-ddpm", "artifact_location": (tmp_path / "art").as_uri()},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = JobSpec.model_validate(data)
    first = run_job(spec)
    again = run_job(spec)  # a rerun is a second attempt, every stage skipped

    # Audit: two attempts in storage, the latest shown by `retrack audit`, the record in MLflow.
    attempts = AuditLog(tmp_path / "jobs").attempts("req-audit")
    assert [a.status for a in attempts] == ["succeeded", "succeeded"]
    assert attempts[0].stages_run == first.stages_run and attempts[1].stages_skipped == again.stages_skipped == list(first.stages_run)
    requested = read_forget_ids(root / "bench" / "forget_ids.txt")
    a = attempts[-1]
    assert a.requested_forget == {"digest": ids_digest(requested), "count": len(requested)}
    assert a.model["version"] == first.model_version and a.parent_model == {"uri": str(root / "original"), "version": "1", "registered_model": "audit-ddpm"}
    assert a.verdict == first.verdict and a.metrics and a.config_hash == spec.config_hash()
    shown = CliRunner().invoke(app, ["audit", "req-audit", "--spec", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    assert len(json.loads(shown.output)["attempts"]) == 2
    listed = json.loads(CliRunner().invoke(app, ["audit", "--spec", str(path), "--model", "audit-ddpm", "--json"]).output)
    assert [(r["request_id"], r["version"]) for r in listed] == [("req-audit", first.model_version)]
    client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    run = client.get_run(a.model["run_id"])
    assert run.data.tags["retrack.audit.status"] == "succeeded" and run.data.tags["retrack.verdict"] == first.verdict
    assert {f.path for f in client.list_artifacts(run.info.run_id, "audit")} == {f"audit/{x.attempt}.json" for x in attempts}

    # Privacy: what is forgotten, in every form the job could have written it.
    forget = set(requested) | set(json.loads((tmp_path / "jobs" / "req-audit" / spec.config_hash() / "neighbours.json").read_text()))
    rows = [r for r in iter_rows(root / "bench" / "corpus") if r["id"] in forget]
    unique = {r["image"]: r for r in rows}  # the planted copies share their bytes
    content = ForgetContent(images_u8=[decode_image(b) for b in unique], encoded=list(unique), captions=[r["caption"] for r in rows], ids=sorted(forget))
    no_ids = replace(content, ids=[])

    jobs = Location.parse(tmp_path / "jobs")
    job_dir = f"req-audit/{spec.config_hash()}/"
    # forget_ids.txt and neighbours.json hold the ids by design (the job resumes from them); the
    # index under indexes/ and the id table under corpus-ids/ are the corpus's own vectors and ids
    # (corpus data, shared by requests).
    working = {job_dir + "forget_ids.txt", job_dir + "neighbours.json"}
    report = scan_location(jobs, content, skip=lambda rel: rel in working or rel.startswith(("indexes/", "corpus-ids/")))
    for rel in working:
        report.add((tmp_path / "jobs" / rel).read_bytes(), rel, no_ids)
    scanned = {Path(f).name for f in map(str, (tmp_path / "jobs").rglob("*")) if Path(f).is_file()}
    assert {"unet.safetensors", "optimizer.safetensors", "retrack_state.json", "register.json", "report.json"} <= scanned and report.files >= 20
    for where, blob in mlflow_blobs(client, run.info.run_id, [("audit-ddpm", first.model_version)]).items():
        report.add(blob, where, content)
    if (tmp_path / "home").exists():
        scan_location(Location.parse(tmp_path / "home"), content, report)
    out, err = capfd.readouterr()
    report.add(out.encode(), "stdout", content)
    report.add(err.encode(), "stderr", content)
    ray_logs = _ray_logs_dir()
    if ray_logs is not None:
        for f in sorted(ray_logs.rglob("*")):
            if f.is_file():
                report.add(f.read_bytes(), f"ray log {f.name}", content)
    index = scan_location(jobs / "indexes", content)
    ids = scan_location(jobs / "corpus-ids", content)
    corpus = scan_location(Location.parse(root / "bench" / "corpus"), content)
    print(f"\nprivacy scan of job outputs, MLflow and logs: {report.summary()}\n"
          f"corpus-derived index (not a job output): {index.summary()}\ncorpus id table (not a job output): {ids.summary()}\n"
          f"corpus itself (scanner check): {corpus.summary()}")
    assert report.findings == [] and report.bytes_found == 0
    # The scan can fail: the same needles find the forget items in the corpus they came from.
    assert corpus.bytes_found > 0 and {f.what for f in corpus.findings} >= {"encoded image", "caption", "forget id"}


def _ray_logs_dir() -> Path | None:
    """The logs of the Ray instance the job started in this process (its workers' output)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return Path(node.get_logs_dir_path()) if ray.is_initialized() and node is not None else None
    except (ImportError, AttributeError):
        return None
