"""Verdict logic and the report: complete files, and no forgotten content in them."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from retrack.evaluation.report import write_report
from retrack.evaluation.report_images import REDACTED, grid
from retrack.evaluation.verdict import decide


def test_verdict_needs_low_frequency_and_no_remembered_item():
    before = {"forget_frequency": 0.03}
    ok = decide(before, {"forget_frequency": 0.002}, {"remembered_count": 0, "percentiles": [0.4, 0.5], "alpha": 0.05}, 0.1)
    assert ok.forgotten and ok.label == "forgotten" and ok.reasons == []
    freq = decide(before, {"forget_frequency": 0.01}, None, 0.1)
    assert not freq.forgotten and "above 0.1 x the original's 0.0300" in freq.reasons[0]
    member = decide(before, {"forget_frequency": 0.0}, {"remembered_count": 1, "percentiles": [0.0, 0.5], "alpha": 0.05}, 0.1)
    assert not member.forgotten and "1 of 2 forgotten item(s)" in member.reasons[0]
    never = decide({"forget_frequency": 0.0}, {"forget_frequency": 0.0}, None, 0.1)
    assert never.forgotten


def test_grid_redacts_flagged_tiles():
    rng = np.random.default_rng(0)
    samples = rng.uniform(size=(4, 1, 8, 8)).astype(np.float32)
    img = grid(samples, redact=np.array([False, True, False, False]), ncol=4, scale=1, pad=1)
    tile1 = img[1:9, 10:18]
    assert np.all(tile1 == round(REDACTED * 255))
    tile0 = img[1:9, 1:9]
    np.testing.assert_array_equal(tile0, (samples[0, 0] * 255).round().astype(np.uint8))


def test_report_is_written_atomically_without_forget_content(tmp_path):
    rng = np.random.default_rng(1)
    forget = rng.uniform(size=(1, 8, 8)).astype(np.float32)
    before = rng.uniform(size=(16, 1, 8, 8)).astype(np.float32)
    before[[2, 5]] = forget  # the original generated the forgotten image twice
    after = rng.uniform(size=(16, 1, 8, 8)).astype(np.float32)
    redact = np.zeros(16, bool)
    redact[[2, 5]] = True
    metrics = {"original": {"forget_frequency": 0.125, "frechet_distance": 1.0, "forget_loss": 10.0, "integrity": 0.0},
               "unlearned": {"forget_frequency": 0.0, "frechet_distance": 1.1, "forget_loss": 30.0, "integrity": 0.5}}
    verdict = decide(metrics["original"], metrics["unlearned"], None, 0.1)
    out = write_report(tmp_path / "report", "req-7", metrics, verdict, None, before, after, redact, {"model_version": "3"})
    assert sorted(p.name for p in out.iterdir()) == ["metrics.png", "report.json", "report.md", "samples_before_after.png"]
    assert json.loads((out / "report.json").read_text())["verdict"]["verdict"] == "forgotten"
    assert "**forgotten**" in (out / "report.md").read_text()
    png = np.asarray(Image.open(out / "samples_before_after.png"))
    forget_u8 = (forget[0] * 255).round().astype(np.uint8).repeat(4, 0).repeat(4, 1)
    windows = np.lib.stride_tricks.sliding_window_view(png, forget_u8.shape)
    assert not np.any(np.all(windows == forget_u8, axis=(-2, -1)))
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temp dir left behind
