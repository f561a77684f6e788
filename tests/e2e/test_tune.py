"""`retrack tune` for real: Ray Tune trials that each drive a Ray Train run on a local Ray instance,
MLflow child runs, the Pareto front, early stopping and resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.tune import TUNE_DIR, run_tune
from retrack.embedded.benchmark import BenchmarkInfo
from retrack.models.pixel import DIGEST_FILE
from retrack.config.spec import JobSpec, load_spec
from retrack.tuning.search import dominates
from tests.fixtures.processes import kill_retrack_when

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


def write_spec(bench, model: Path, tmp_path: Path, request_id: str, tune: dict, **extra) -> Path:
    spec = {
        "request_id": request_id,
        "model": {"uri": str(model)},
        "corpus": {"uri": str(bench.corpus)},
        "forget": {"file": str(bench.forget_ids), "duplicates": "add"},
        # The paper's MNIST budget with lambda 0.05 and K 10 is the baseline trial.
        "method": {"name": "retrack", "params": {"lambda": 0.05, "k": 10}},
        "train": {"steps": 50, "batch_size": 128, "lr": 5e-5},
        "evaluation": {"num_samples": 500, "forget_threshold": BenchmarkInfo.load(bench.root).forget_threshold},
        "storage": {"root": str(tmp_path / "jobs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "digits-ddpm", "artifact_location": (tmp_path / "art").as_uri()},
        "tune": tune,
        **extra,
    }
    path = tmp_path / f"{request_id}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tune_dir(spec: JobSpec) -> Path:
    return Path(spec.storage.root) / spec.request_id / spec.config_hash() / TUNE_DIR


def test_small_search_matches_or_beats_the_default_with_nested_runs(ray_local, bench, memorising_model, tmp_path):
    """Four trials on the embedded benchmark: lambda x learning rate. The two with a destructive
    learning rate are stopped early by the health scalar; the chosen configuration is at least
    as good as the default on both objectives; every trial is a child run of the tuning run."""
    from mlflow import MlflowClient

    spec = load_spec(write_spec(bench, memorising_model, tmp_path, "req-tune", {
        "search": "grid", "trials": 4, "num_samples": 500, "report_every": 5, "collapse_ratio": 3.0,
        "space": {"lambda": {"values": [0.035, 0.05]}, "lr": {"values": [5e-5, 0.5]}},
    }))
    result = run_tune(spec)

    by_params = {(o.params["lambda"], o.params["lr"]): o for o in result.outcomes}
    assert len(by_params) == 4
    for lam in (0.035, 0.05):
        hopeless = by_params[(lam, 0.5)]
        assert hopeless.status in ("collapsed", "diverged"), hopeless
        if hopeless.status == "collapsed":  # stopped by the reported scalar, well before the end
            assert hopeless.metrics["retain_loss_ratio"] > 3.0 and hopeless.metrics["stopped_step"] < 50
    default = by_params[(0.05, 5e-5)]
    assert default.default and default.status == "ok"
    chosen = result.chosen
    assert chosen.metrics["forget_frequency"] <= default.metrics["forget_frequency"]
    assert chosen.metrics["frechet_distance"] <= default.metrics["frechet_distance"]
    assert chosen.metrics["forget_frequency"] <= 0.1 * result.original["forget_frequency"]
    assert not any(dominates(o, chosen) for o in result.outcomes if o.status == "ok")

    out = tune_dir(spec)
    assert (out / "pareto.png").stat().st_size > 0
    front = json.loads((out / "pareto.json").read_text())
    assert front["chosen"]["params"] == chosen.params and front["front"]

    client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [r for r in children if "retrack.child" in r.data.tags]
    assert len(trials) == 4
    assert {r.data.params["status"] for r in trials} >= {"ok"}
    assert any(r.data.tags.get("retrack.config_hash") for r in children), "the registration run is nested too"
    mv = client.get_model_version_by_alias("digits-ddpm", "production")
    assert str(mv.version) == result.job.model_version
    assert json.loads(mv.tags["retrack.method_params"])["lambda"] == chosen.params["lambda"]


def test_killed_search_resumes_without_rerunning_finished_trials(ray_local, bench, memorising_model, tmp_path):
    """SIGKILL `retrack tune` (Optuna search) as soon as its first trial has recorded its outcome,
    before Tune has saved that trial's end (Tune saves its state at most every 10 s; the killed
    run is made to save it only once, at the start, so the kill always lands in that window).
    The rerun restores the Tune experiment; the finished trial is started again but repeats its
    recorded report (same scores and unlearning time) without training again; the rest run.
    Each trial trains two seeds and reports their mean."""
    path = write_spec(bench, memorising_model, tmp_path, "req-resume", {
        "search": "optuna", "trials": 3, "num_samples": 64, "max_concurrent_trials": 1, "seeds_per_trial": 2,
        "space": {"lambda": {"low": 0.05, "high": 0.2}}, "select": {"max_frequency_ratio": 1.0},
    }, train={"steps": 4, "batch_size": 16, "lr": 5e-5}, evaluation={"num_samples": 64})
    spec = load_spec(path)
    records = tune_dir(spec) / "outcomes"

    def finished() -> list[dict]:
        reports = [json.loads(p.read_text()) for p in records.glob("*.json")]
        return [r for r in reports if r["status"] == "ok"]

    kill_retrack_when(["tune", str(path)], finished, "a trial finished", timeout=900, poll=0.2, env={"TUNE_GLOBAL_CHECKPOINT_S": "3600"})
    done_before = finished()
    assert 1 <= len(done_before) < 3
    trained = {r["model_dir"]: (Path(r["model_dir"]) / DIGEST_FILE).stat().st_mtime_ns for r in done_before}

    for report in done_before:  # two training seeds scored; the trial reports their mean, keeps seed 0's model
        assert [r["seed"] for r in report["per_seed"]] == [0, 1]
        for k in ("forget_loss", "frechet_distance", "integrity"):
            assert report[k] == pytest.approx(sum(r[k] for r in report["per_seed"]) / 2)
        assert report["per_seed"][0]["forget_loss"] != report["per_seed"][1]["forget_loss"]
        assert not list(Path(report["model_dir"]).parent.glob("*.seed-*")), "a scratch seed's model was kept"

    result = run_tune(spec)
    assert sorted(o.status for o in result.outcomes) == ["ok", "ok", "ok"]
    by_model = {o.model_dir: o for o in result.outcomes}
    for report in done_before:
        model = report["model_dir"]
        assert (Path(model) / DIGEST_FILE).stat().st_mtime_ns == trained[model], f"{model} trained again"
        again = by_model[model].metrics
        assert report["unlearn_seconds"] > 0 and again["unlearn_seconds"] == report["unlearn_seconds"], f"{model} reported anew"
        assert (again["forget_frequency"], again["frechet_distance"]) == (report["forget_frequency"], report["frechet_distance"])
    assert result.job.verdict in ("forgotten", "not forgotten")
