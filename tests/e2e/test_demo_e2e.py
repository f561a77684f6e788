"""`retrack demo --quick` from a clean home: the whole default chain, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrack.embedded.demo import demo_spec
from retrack.embedded.shipped import SHIPPED
from retrack.embedded.workspace import Workspace
from retrack.models.pixel import DIGEST_FILE

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_quick_registers_a_forgotten_version(tmp_path):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    env = {**os.environ, "RETRACK_HOME": str(home)}
    exe = Path(sys.executable).with_name("retrack")
    start = time.monotonic()
    proc = subprocess.run([str(exe), "demo", "--quick"], env=env, capture_output=True, text=True, timeout=2400, cwd=tmp_path)
    print(f"\nretrack demo --quick from a clean home: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Nothing pretrained: the shipped original and classifier were installed.
    assert "pretrain: cached or shipped weights are used" in proc.stdout + proc.stderr
    shipped = SHIPPED / "quick" / "original" / DIGEST_FILE
    assert (Workspace(home).model_dir("original", "quick") / DIGEST_FILE).read_text() == shipped.read_text()
    # stderr is a pipe: each long stage of the job logged plain progress lines, the last at its end.
    for part in ("index encode", "unlearn steps", "evaluate samples"):
        assert re.search(rf"^\S+ \S+ {part}: (\d+)/\1 \(100%\), \S+, elapsed \S+, ETA 0:00:00", proc.stderr, re.M), part
    spec = demo_spec(Workspace(home), quick=True)
    job = home / "jobs" / spec.request_id / spec.config_hash()
    for stage in ("index", "neighbours", "unlearn", "evaluate", "register"):
        assert (job / "stages" / f"{stage}.json").is_file()
    report = json.loads((job / "report" / "report.json").read_text())
    assert report["verdict"]["verdict"] == "forgotten", report["verdict"]
    m = report["metrics"]
    assert m["original"]["forget_frequency"] > 0
    assert m["unlearned"]["forget_frequency"] < m["original"]["forget_frequency"]
    assert (job / "report" / "samples_before_after.png").is_file()
    client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    mv = client.get_model_version_by_alias(spec.mlflow.registered_model, "production")
    assert mv.tags["retrack.request_id"] == spec.request_id
    assert "verdict: forgotten" in proc.stderr + proc.stdout
