"""The promotion gate: the decision from the verdict and the quality ceilings, the spec's gate
(defaults, kinds, hash) and the exit code each outcome gives `retrack run`."""

from __future__ import annotations

import math

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.cli.exit_codes import EXIT_CODES_HELP, ExitCode
from retrack.config.model_kind import ModelKind
from retrack.config.spec import GateSpec, parse_spec
from retrack.evaluation.verdict import FORGOTTEN, NOT_FORGOTTEN, PROMOTED, QUALITY_GATE, decide, promotion

PIXEL = GateSpec().ceilings(ModelKind.PIXEL_DDPM)
ORIGINAL = {"forget_frequency": 0.03, "frechet_distance": 10.0, "integrity_ratio": 0.0}


def unlearned(**metrics) -> dict:
    return {"forget_frequency": 0.0, "frechet_distance": 11.0, "integrity_ratio": 0.1, **metrics}


def test_a_forgotten_version_within_the_gate_is_promoted():
    p = promotion(FORGOTTEN, [], ORIGINAL, unlearned(), PIXEL)
    assert (p.outcome, p.promoted, p.gate_failed, p.reasons) == (PROMOTED, True, [], [])
    assert p.tags() == {"outcome": "promoted", "gate": "passed"}


def test_not_forgotten_wins_and_the_gate_is_still_reported():
    verdict = decide(ORIGINAL, unlearned(forget_frequency=0.02), None, 0.1)
    p = promotion(verdict.label, verdict.reasons, ORIGINAL, unlearned(forget_frequency=0.02, frechet_distance=80.0), PIXEL)
    assert (p.outcome, p.promoted, p.gate_failed) == (NOT_FORGOTTEN, False, ["max_frechet_ratio"])
    assert p.reasons[0].startswith("forget frequency 0.0200 is above 0.1 x") and "Fréchet ratio 8 is above max_frechet_ratio 2" in p.reasons[1]
    assert p.to_dict()["promoted"] is False and p.tags() == {"outcome": "not_forgotten", "gate": "failed: max_frechet_ratio"}


@pytest.mark.parametrize("metrics, failed", [
    ({"frechet_distance": 20.01}, ["max_frechet_ratio"]),
    ({"integrity_ratio": 0.51}, ["max_integrity_ratio"]),
    ({"frechet_distance": 25.0, "integrity_ratio": 0.9}, ["max_frechet_ratio", "max_integrity_ratio"]),
    ({"integrity_ratio": math.nan}, ["max_integrity_ratio"]),  # a figure that is not a number fails
])
def test_a_forgotten_version_above_a_ceiling_misses_the_gate(metrics, failed):
    p = promotion(FORGOTTEN, [], ORIGINAL, unlearned(**metrics), PIXEL)
    assert (p.outcome, p.gate_failed) == (QUALITY_GATE, failed)
    assert len(p.reasons) == len(failed) and all(r.startswith("quality gate: ") for r in p.reasons)


def test_ceilings_hold_at_their_value_and_a_missing_figure_fails():
    assert promotion(FORGOTTEN, [], ORIGINAL, unlearned(frechet_distance=20.0, integrity_ratio=0.5), PIXEL).promoted
    missing = unlearned()
    del missing["integrity_ratio"]
    p = promotion(FORGOTTEN, [], ORIGINAL, missing, PIXEL)
    assert p.gate_failed == ["max_integrity_ratio"] and "'integrity_ratio' was not measured" in p.reasons[0]


def test_the_ceilings_of_each_model_kind_and_null_turns_one_off():
    assert PIXEL == {"max_frechet_ratio": 2.0, "max_integrity_ratio": 0.5}
    assert GateSpec().ceilings(ModelKind.STABLE_DIFFUSION) == {"max_integrity_ratio": 0.5}  # no Fréchet distance for SD
    off = GateSpec(max_frechet_ratio=None).ceilings(ModelKind.PIXEL_DDPM)
    assert off == {"max_integrity_ratio": 0.5}
    assert promotion(FORGOTTEN, [], ORIGINAL, unlearned(frechet_distance=1e6), off).promoted
    sd = {"forget_frequency": 0.0, "integrity_ratio": 0.2}  # an SD evaluation has no Fréchet distance
    assert promotion(FORGOTTEN, [], {"forget_frequency": 0.5}, sd, GateSpec().ceilings(ModelKind.STABLE_DIFFUSION)).promoted


def spec(tmp_path, **evaluation) -> dict:
    return {"request_id": "req-gate", "model": {"uri": "/models/m"}, "corpus": {"uri": "/data/c"}, "forget": {"ids": ["a"]},
            "evaluation": {"num_samples": 32, **evaluation}, "storage": {"root": str(tmp_path)},
            "mlflow": {"tracking_uri": "sqlite:///m.db", "registered_model": "m"}}


def test_a_gate_at_its_defaults_keeps_the_hash_and_a_changed_one_is_a_new_job(tmp_path):
    plain = parse_spec(yaml.safe_dump(spec(tmp_path)), "a").config_hash()
    assert parse_spec(yaml.safe_dump(spec(tmp_path, gate={"max_frechet_ratio": 2.0})), "b").config_hash() == plain
    assert parse_spec(yaml.safe_dump(spec(tmp_path, gate={"max_frechet_ratio": 1.5})), "c").config_hash() != plain
    assert parse_spec(yaml.safe_dump(spec(tmp_path, gate={"max_integrity_ratio": None})), "d").config_hash() != plain


def test_each_outcome_has_its_own_exit_code_listed_in_the_help():
    codes = {o: ExitCode.of_outcome(o) for o in (PROMOTED, NOT_FORGOTTEN, QUALITY_GATE)}
    assert codes == {PROMOTED: 0, NOT_FORGOTTEN: 3, QUALITY_GATE: 4}
    assert len({int(c) for c in ExitCode}) == len(ExitCode) and ExitCode.REFUSED == 2 and ExitCode.FAILED == 1
    for command in (["run", "--help"], ["tune", "--help"], ["demo", "--help"], ["queue", "run", "--help"]):
        shown = " ".join(CliRunner().invoke(app, command, env={"COLUMNS": "200"}).output.split())
        assert all(f"{int(c)}: " in shown for c in ExitCode), command
    assert "3: registered, not promoted: the verdict is 'not forgotten'" in EXIT_CODES_HELP


def test_a_finished_job_exits_with_its_outcome_and_says_why(capsys):
    import typer

    from pipelines.cli.job import finish
    from pipelines.job import JobResult
    from pipelines.progress import console

    metrics = {"original": ORIGINAL, "unlearned": unlearned(frechet_distance=25.0)}
    missed = promotion(FORGOTTEN, [], metrics["original"], metrics["unlearned"], PIXEL)
    result = JobResult("req-1", "7", FORGOTTEN, "s3://b/report", metrics, outcome=missed.outcome, reasons=missed.reasons)
    with console.capture() as shown, pytest.raises(typer.Exit) as exited:
        finish(result)
    assert exited.value.exit_code == ExitCode.QUALITY_GATE == 4
    text = shown.get()
    assert "promoted: no (quality gate)" in text and "quality gate: Fréchet ratio 2.5 is above max_frechet_ratio 2" in text
    with console.capture() as shown:
        finish(JobResult("req-1", "8", FORGOTTEN, "s3://b/report", metrics, outcome=PROMOTED))  # exit 0: returns
    assert "promoted: yes" in shown.get()
