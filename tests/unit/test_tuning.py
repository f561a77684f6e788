"""The tuning section of the job spec, the Pareto front, the selection rule and the health scalar
(no Ray: `tests/e2e/test_tune.py` runs real searches)."""

from __future__ import annotations

import math

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.tune.space import search_algorithm
from pipelines.tune.trial import outcome, saved_outcome
from retrack.errors import InputError
from retrack.config.spec import parse_spec
from retrack.tuning.search import (
    HEALTH_METRIC,
    NoAcceptableTrialError,
    RetainLossRatio,
    SelectRule,
    TrialOutcome,
    choose,
    default_point,
    pareto_front,
)


def base_spec(tmp_path, **extra) -> dict:
    return {
        "request_id": "req-tune",
        "model": {"uri": str(tmp_path / "model")},
        "corpus": {"uri": str(tmp_path / "corpus")},
        "forget": {"ids": ["a"]},
        "method": {"name": "retrack", "params": {"lambda": 0.05, "k": 10}},
        "storage": {"root": str(tmp_path / "jobs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "m"},
        **extra,
    }


def parse(tmp_path, tune: dict, **extra):
    return parse_spec(yaml.safe_dump(base_spec(tmp_path, tune=tune, **extra)), "spec.yaml")


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"space": {"lambda": {"low": 0.2, "high": 0.1}}}, "tune.space.lambda: inverted range: low 0.2 is above high 0.1"),
        ({"space": {"lambda": {"low": 0.1, "high": 0.1}}}, "tune.space.lambda: empty range: low equals high"),
        ({"space": {"lambda": {"values": []}}}, "tune.space.lambda: values is empty"),
        ({"space": {"lambda": {"low": 0.1}}}, "a range needs both low and high"),
        ({"space": {"lr": {"low": 0.0, "high": 1e-3, "log": True}}}, "a log range needs low > 0"),
        ({"space": {}}, "tune.space"),
        ({"trials": 0, "space": {"lambda": {"low": 0.01, "high": 0.1}}}, "tune.trials: Input should be greater than or equal to 1"),
        ({"search": "grid", "trials": 3, "space": {"lambda": {"values": [0.01, 0.1]}, "k": {"values": [5, 10]}}},
         "a budget of 3 trial(s) is smaller than the grid's 4 points"),
        ({"search": "grid", "space": {"lambda": {"low": 0.01, "high": 0.1}}}, "grid search needs values lists, not ranges, for: lambda"),
        ({"space": {"lambda": {"low": 0.1, "high": 1.5}}}, "tune.space.lambda: 1.5 is not valid"),
        ({"space": {"k": {"low": 2, "high": 5.5}}}, "tune.space.k: 5.5 is not an integer"),
        ({"space": {"eta": {"low": 0.001, "high": 0.01}}}, "tune.space.eta: not a parameter of method 'retrack'"),
        ({"space": {"lambda": {"low": 0.01, "high": 0.1}}, "num_samples": 4}, "tune.num_samples"),
    ],
)
def test_bad_search_spaces_are_refused_naming_the_field(tmp_path, tune, message):
    with pytest.raises(InputError) as err:
        parse(tmp_path, tune)
    assert message in str(err.value)


def test_cli_refuses_a_bad_range_before_any_work(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base_spec(tmp_path, tune={"space": {"lambda": {"low": 0.3, "high": 0.1}}})))
    result = CliRunner().invoke(app, ["tune", str(path)])
    assert result.exit_code == 2
    assert "inverted range" in result.output
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_refuses_a_spec_without_a_search(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base_spec(tmp_path)))
    result = CliRunner().invoke(app, ["tune", str(path)])
    assert result.exit_code == 2 and "no `tune` section" in result.output
    assert not (tmp_path / "jobs").exists()


def test_a_search_changes_the_config_hash_and_its_absence_does_not(tmp_path):
    plain = parse_spec(yaml.safe_dump(base_spec(tmp_path)), "a")
    explicit_none = parse_spec(yaml.safe_dump(base_spec(tmp_path, tune=None)), "b")
    tuned = parse(tmp_path, {"space": {"lambda": {"low": 0.01, "high": 0.1}}})
    assert plain.config_hash() == explicit_none.config_hash()
    assert tuned.config_hash() != plain.config_hash()


def test_an_unset_forget_batch_keeps_the_spec_hash_it_had_before_the_field_existed():
    spec = {"request_id": "req-hash", "model": {"uri": "/models/m"}, "corpus": {"uri": "/data/corpus"}, "forget": {"ids": ["a"]},
            "method": {"name": "retrack", "params": {"lambda": 0.05, "k": 10}}, "train": {"steps": 40, "lr": 7e-5},
            "storage": {"root": "/jobs"}, "mlflow": {"tracking_uri": "sqlite:////tmp/m.db", "registered_model": "m"}}
    # Computed with the code before train.forget_batch_size existed: storage prefixes stay where they were.
    assert parse_spec(yaml.safe_dump(spec), "a").config_hash() == "9556deee0ab5c7b1"
    spec["train"]["forget_batch_size"] = 32
    assert parse_spec(yaml.safe_dump(spec), "b").config_hash() != "9556deee0ab5c7b1"


def test_grid_and_default_point(tmp_path):
    spec = parse(tmp_path, {"search": "grid", "trials": 4, "space": {"lambda": {"values": [0.03, 0.05]}, "lr": {"values": [5e-5, 1e-4]}}})
    assert spec.tune.grid() == [{"lambda": 0.03, "lr": 5e-5}, {"lambda": 0.03, "lr": 1e-4}, {"lambda": 0.05, "lr": 5e-5}, {"lambda": 0.05, "lr": 1e-4}]
    assert default_point(spec.tune.space, spec.method, spec.train) == {"lambda": 0.05, "lr": 5e-5}
    assert spec.tune.kinds("retrack") == {"lambda": float, "lr": float}


def trial(tid: str, freq: float, fd: float, status: str = "ok") -> TrialOutcome:
    metrics = {"forget_frequency": freq, "frechet_distance": fd} if status == "ok" else {}
    return TrialOutcome(trial_id=tid, params={"lambda": float(len(tid))}, status=status, metrics=metrics)


@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_both_searches_limit_how_many_trials_run_at_once(tmp_path, search):
    """Tune applies max_concurrent_trials only to Searchers; the grid generator must carry it."""
    spec = parse(tmp_path, {"search": search, "trials": 4, "space": {"lambda": {"values": [0.03, 0.05]}, "k": {"values": [5, 10]}}})
    searcher, _, _ = search_algorithm(spec, default_point(spec.tune.space, spec.method, spec.train), concurrency=2)
    assert searcher.max_concurrent == 2


def test_pareto_front_keeps_only_non_dominated_ok_trials():
    trials = [trial("a", 0.0, 14.0), trial("b", 0.001, 13.0), trial("c", 0.001, 13.5), trial("d", 0.02, 12.0),
              trial("e", 0.0, 15.0), trial("f", 0.0, 1.0, status="collapsed"), trial("g", 0.03, 20.0)]
    assert [t.trial_id for t in pareto_front(trials)] == ["a", "b", "d"]


def test_choice_is_the_least_damaging_trial_that_forgets_enough():
    trials = [trial("a", 0.0, 14.0), trial("b", 0.002, 13.0), trial("d", 0.02, 12.0)]
    assert choose(trials, original_frequency=0.03, rule=SelectRule(max_frequency_ratio=0.1)).trial_id == "b"
    assert choose(trials, original_frequency=0.03, rule=SelectRule(max_frequency_ratio=0.1, max_forget_frequency=0.001)).trial_id == "a"
    with pytest.raises(NoAcceptableTrialError, match=r"forget frequency <= 0\.0030\); the best reached 0\.0200"):
        choose([trial("d", 0.02, 12.0), trial("x", 0.0, 1.0, status="diverged")], original_frequency=0.03, rule=SelectRule())


def test_retain_loss_ratio_tracks_the_retain_branch():
    steady, rising = RetainLossRatio(), RetainLossRatio()
    for _ in range(10):
        r_steady = steady.update({"loss_retain": 0.5})
    for step in range(10):
        r_rising = rising.update({"loss_retain": 0.5 * (1 + step)})
    assert r_steady == pytest.approx(1.0)
    assert r_rising > 3.0
    wrecked = RetainLossRatio()  # destroyed by the first update: the baseline stays the healthy loss
    ratios = [wrecked.update({"loss_retain": v}) for v in (0.5, 400.0, 900.0, 1000.0)]
    assert ratios[-1] > 100
    assert RetainLossRatio().update({"loss_forget": 1.0}) is None
    nan = RetainLossRatio()
    nan.update({"loss_retain": 0.5})
    assert math.isnan(nan.update({"loss_retain": float("nan")}))


def test_trial_outcomes_are_classified_from_their_last_result():
    kinds, default = {"lambda": float}, {"lambda": 0.05}
    ok = outcome("1", {"lambda": 0.05}, kinds, {"status": "ok", "forget_frequency": 0.0, "frechet_distance": 12.0, "model_dir": "/m"}, False, default)
    assert (ok.status, ok.default, ok.model_dir, ok.point) == ("ok", True, "/m", (0.0, 12.0))
    collapsed = outcome("2", {"lambda": 0.9}, kinds, {"status": "collapsed", HEALTH_METRIC: 7.0, "stopped_step": 10}, False, default)
    assert (collapsed.status, collapsed.default, collapsed.model_dir, collapsed.metrics["stopped_step"]) == ("collapsed", False, None, 10)
    assert outcome("3", {"lambda": 0.9}, kinds, {"status": "diverged"}, False, default).status == "diverged"
    assert outcome("4", {"lambda": 0.9}, kinds, None, True, default).status == "failed"
    assert outcome("5", {"lambda": 0.9}, kinds, {HEALTH_METRIC: 1.1}, False, default).status == "failed"  # killed mid-training


def test_cli_refuses_to_tune_a_stable_diffusion_request(tmp_path):
    spec = base_spec(tmp_path, tune={"space": {"lambda": {"low": 0.01, "high": 0.1}}})
    spec["model"]["kind"] = "stable-diffusion"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    for command in ("tune", "validate"):  # the spec itself is refused: `retrack validate` says so too
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2 and "pixel-DDPM metrics" in result.output
    assert not (tmp_path / "jobs").exists()


def test_a_rerun_trial_repeats_its_report_only_while_its_model_is_the_one_it_scored(tmp_path):
    from retrack.models.pixel import write_model_dir
    from retrack.storage.location import Location

    model = Location.parse(tmp_path / "models" / "k")
    record = Location.parse(tmp_path / "outcomes" / "k.json")
    assert saved_outcome(record, model) is None  # never finished

    digest = write_model_dir(model.path, lambda tmp: (tmp / "weights").write_text("first"))
    report = {"status": "ok", "forget_frequency": 0.0, "frechet_distance": 9.5, "unlearn_seconds": 4.2, "model_digest": digest}
    record.write_json(report)
    assert saved_outcome(record, model) == report

    write_model_dir(model.path, lambda tmp: (tmp / "weights").write_text("second"))  # replaced since it was scored
    assert saved_outcome(record, model) is None

    collapsed = {"status": "collapsed", "stopped_step": 12, HEALTH_METRIC: 4.0}
    record.write_json(collapsed)  # no model to check: the stop itself is the outcome
    assert saved_outcome(record, model) == collapsed
