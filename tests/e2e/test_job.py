"""`retrack run` end to end on a small benchmark: every stage's artifacts, resume, idempotence."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from tests.fixtures.processes import kill_retrack_when
from tests.fixtures.specs import spec_file

pytestmark = pytest.mark.integration


def test_run_writes_every_stage_and_rerun_skips_them(small, tmp_path):
    from mlflow import MlflowClient

    from retrack.config.spec import load_spec

    path = spec_file(small, tmp_path)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output  # promoted: forgotten within the quality gate
    assert "promoted: yes" in result.output
    spec = load_spec(path)
    job = tmp_path / "jobs" / spec.request_id / spec.config_hash()
    for stage in ("index", "neighbours", "unlearn", "evaluate", "register"):
        assert json.loads((job / "stages" / f"{stage}.json").read_text())["config_hash"] == spec.config_hash()
    assert (job / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert {p.name for p in (job / "report").iterdir()} == {"metrics.png", "report.json", "report.md", "samples_before_after.png"}
    nb = json.loads((job / "neighbours.json").read_text())
    assert nb and all(len(v) == 4 for v in nb.values())
    client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    versions = client.search_model_versions("name = 'small-ddpm'")
    assert len(versions) == 1 and versions[0].tags["retrack.request_id"] == "req-small"
    assert client.get_model_version_by_alias("small-ddpm", "production").version == versions[0].version

    again = CliRunner().invoke(app, ["run", str(path)])
    assert again.exit_code == 0, again.output
    assert "index" not in [l.strip() for l in again.output.splitlines() if l.strip().startswith("─")]
    assert len(client.search_model_versions("name = 'small-ddpm'")) == 1


def test_stage_killed_midway_is_the_only_one_redone(small, tmp_path):
    from pipelines.job import run_job
    from retrack.config.spec import load_spec

    from retrack.evaluation.metrics import ReferenceStats

    bench = small / "bench"
    # The evaluation reads a 128-item sample of the ~300 retained items, and keeps its reference.
    evaluation = {"num_samples": 32, "holdout_uri": str(bench / "holdout"), "reference_items": 128}
    spec = load_spec(spec_file(small, tmp_path, request_id="req-resume", evaluation=evaluation))
    first = run_job(spec)
    assert first.stages_run == ["index", "neighbours", "unlearn", "evaluate", "register"]
    job = tmp_path / "jobs" / spec.request_id / spec.config_hash()
    [reference] = (tmp_path / "jobs" / "references").iterdir()
    stats = reference / "stats.safetensors"
    assert (reference / "classifier" / "model.safetensors").is_file()
    assert 64 < ReferenceStats.load(stats).count <= 128  # the sample's items, less the forgotten ones' look-alikes
    written = stats.stat().st_mtime_ns
    # As if the job had been killed after unlearning: the later markers never got written.
    (job / "stages" / "evaluate.json").unlink()
    (job / "stages" / "register.json").unlink()
    second = run_job(spec)
    assert second.stages_skipped == ["index", "neighbours", "unlearn"]
    assert second.stages_run == ["evaluate", "register"]
    assert second.model_version == first.model_version
    assert second.metrics == first.metrics  # the same reference, read back rather than rebuilt
    assert [reference] == list((tmp_path / "jobs" / "references").iterdir()) and stats.stat().st_mtime_ns == written


def test_bad_spec_registers_nothing_and_trains_nothing(small, tmp_path):
    path = spec_file(small, tmp_path, request_id="req-bad")
    data = yaml.safe_load(path.read_text())
    data["forget"]["file"] = str(tmp_path / "ids.txt")
    (tmp_path / "ids.txt").write_text("no-such-id\n")
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "not in the corpus" in result.output
    assert not (tmp_path / "jobs" / "req-bad").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # 62 s; test_stage_killed_midway_is_the_only_one_redone covers resuming by default
def test_run_killed_for_real_between_stages_resumes_without_redoing_them(small, tmp_path):
    """SIGKILL the `retrack run` process group right after unlearning finished; the rerun skips
    index, neighbours and unlearn and registers exactly one version."""

    from mlflow import MlflowClient

    from pipelines.job import run_job
    from retrack.config.spec import load_spec

    path = spec_file(small, tmp_path, request_id="req-kill")
    spec = load_spec(path)
    stages = tmp_path / "jobs" / spec.request_id / spec.config_hash() / "stages"
    kill_retrack_when(["run", str(path)], (stages / "unlearn.json").exists, "unlearning finished")
    assert not (stages / "register.json").exists()
    result = run_job(spec)
    assert result.stages_skipped[:3] == ["index", "neighbours", "unlearn"]
    assert "register" in result.stages_run
    versions = MlflowClient(tracking_uri=spec.mlflow.tracking_uri).search_model_versions("name = 'small-ddpm'")
    assert len(versions) == 1


def jpeg(image_u8) -> bytes:
    """A re-encoded copy: JPEG, so its pixels no longer equal the corpus item's."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_u8[:, :, 0]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_a_request_by_picture_forgets_every_copy(small, tmp_path):
    """The planted item, re-encoded as a JPEG, is the whole request: the job finds each of its
    copies through the index and forgets them all; the audit keeps the picture's digest and count,
    and no record holds the picture or the ids."""
    from retrack.audit import AuditLog
    from retrack.config.spec import load_spec
    from retrack.data.corpus import decode_image, iter_rows
    from retrack.data.forget import read_forget_ids
    from retrack.digest import ids_digest, sha256_bytes

    bench = small / "bench"
    copies = read_forget_ids(bench / "forget_ids.txt")
    planted = decode_image(next(r["image"] for r in iter_rows(bench / "corpus") if r["id"] == copies[0]))
    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg(planted))
    assert not (decode_image(query.read_bytes()) == planted).all()  # a copy, not the same pixels
    path = spec_file(small, tmp_path, request_id="req-picture", forget={"images": [str(query)], "duplicates": "add"})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert f"1 picture(s) matched {len(copies)} corpus item(s)" in result.output
    spec = load_spec(path)
    job = tmp_path / "jobs" / spec.request_id / spec.config_hash()
    assert sorted((job / "forget_ids.txt").read_text().split()) == sorted(copies)
    nb = json.loads((job / "stages" / "neighbours.json").read_text())
    assert nb["forget_count"] == len(copies) and nb["forget_ids_digest"] == ids_digest(copies)
    (record,) = AuditLog(tmp_path / "jobs").attempts(spec.request_id)
    assert record.requested_forget == {"digest": ids_digest([sha256_bytes(query.read_bytes())]), "count": 1, "by": "picture"}
    text = json.dumps(record.to_dict())
    assert not any(i in text for i in copies) and str(query) not in text


@pytest.mark.slow
def test_a_picture_that_is_not_in_the_corpus_fails_the_job(small, tmp_path):
    """A held-out digit is no corpus item's copy: the job stops after the index, saying so (exit 2),
    and registers nothing."""
    from retrack.config.spec import load_spec
    from retrack.data.corpus import decode_image, iter_rows

    stranger = tmp_path / "stranger.jpg"
    stranger.write_bytes(jpeg(decode_image(next(iter_rows(small / "bench" / "holdout"))["image"])))
    path = spec_file(small, tmp_path, request_id="req-stranger", forget={"images": [str(stranger)]})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "forget.images entry 1" in result.output and "matches no corpus item within distance" in result.output
    spec = load_spec(path)
    job = tmp_path / "jobs" / spec.request_id / spec.config_hash()
    assert [p.stem for p in (job / "stages").glob("*.json")] == ["index"]  # nothing trained, nothing registered
