"""Every shipped config loads (torchtune's test_configs), and every spec field is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from retrack.config.train import MethodConfig
from retrack.errors import InputError
from retrack.methods import method_names
from retrack.config.spec import JobSpec, load_spec
from tests.fixtures.specs import DELETE, with_field

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
JOB_SPECS = sorted(CONFIGS.glob("*.yaml"))
METHOD_FILES = sorted((CONFIGS / "methods").glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_shipped_job_specs_load(path):
    spec = load_spec(path)
    assert spec.request_id and spec.config_hash()


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_shipped_method_configs_load(path):
    cfg = MethodConfig.model_validate(yaml.safe_load(path.read_text()))
    assert cfg.name == path.stem


def test_one_method_config_per_registered_method():
    assert sorted(p.stem for p in METHOD_FILES) == method_names()
    assert len(JOB_SPECS) >= 2


def test_every_field_is_documented():
    schema = JobSpec.model_json_schema()
    missing = []
    for name, model in [("JobSpec", schema), *schema.get("$defs", {}).items()]:
        for field, prop in model.get("properties", {}).items():
            if "description" not in prop and "$ref" not in prop and "allOf" not in prop:
                missing.append(f"{name}.{field}")
    assert not missing, missing


def _spec(tmp_path, **changes):
    data = yaml.safe_load(JOB_SPECS[0].read_text())
    for dotted, value in changes.items():
        with_field(data, dotted, DELETE if value is None else value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"request_id": None}, "request_id: Field required"),
        ({"train.steps": "many"}, "train.steps: Input should be a valid integer"),
        ({"method.name": "forgetit"}, "unknown method 'forgetit'"),
        ({"method.params": {"lambda": 2}}, "lambda: Input should be less than or equal to 1"),
        ({"request_id": "../../etc"}, "request_id '../../etc' must be"),
        ({"storage.root": "gs://bucket/x"}, "storage.root: unsupported URI scheme"),
        ({"mlflow.tracking_uri": "localhost:5000"}, "mlflow.tracking_uri"),
        ({"forget.ids": ["a"]}, "exactly one of forget.ids, forget.file and forget.images"),
        ({"train.unknown": 1}, "train.unknown: Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_name_the_field(tmp_path, changes, message):
    path = _spec(tmp_path, **changes)
    with pytest.raises(InputError, match=None) as err:
        load_spec(path)
    assert message in str(err.value)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and message in result.output


def test_validate_and_schema_commands(tmp_path):
    ok = CliRunner().invoke(app, ["validate", str(JOB_SPECS[0])])
    assert ok.exit_code == 0 and "valid" in ok.output
    out = CliRunner().invoke(app, ["schema"])
    assert out.exit_code == 0 and '"request_id"' in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("request_id: [unclosed")
    assert CliRunner().invoke(app, ["validate", str(bad)]).exit_code == 2
    (tmp_path / "unsafe.yaml").write_text("!!python/object/apply:os.system ['echo hi']")
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "unsafe.yaml")])
    assert res.exit_code == 2 and "not valid YAML" in res.output
