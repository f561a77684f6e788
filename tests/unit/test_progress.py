"""The plain progress lines a run writes when stderr is not a terminal: their format and their rate."""

from __future__ import annotations

import re

import pytest

from pipelines.progress import Throttle, console, progress_interval, progress_line, stage_progress
from retrack.errors import InputError

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<label>[\w ]+): (?P<done>\d+)/(?P<total>\d+) \(\d+%\), ")


def test_a_line_says_the_stage_done_total_rate_elapsed_and_eta():
    assert progress_line("index encode", 300, 1000, 37.0, 8.1) == "index encode: 300/1000 (30%), 8.1/s, elapsed 0:00:37, ETA 0:01:26"
    assert progress_line("unlearn steps", 40, 60, 3725.0, 250.4, "loss 0.0412") == \
        "unlearn steps: 40/60 (67%), 250/s, elapsed 1:02:05, ETA 0:00:00, loss 0.0412"
    # Slow parts (trials) count per minute; an unknown rate leaves the ETA unknown; the end is 0.
    assert progress_line("tune trials", 2, 8, 600.0, 1 / 300) == "tune trials: 2/8 (25%), 0.2/min, elapsed 0:10:00, ETA 0:30:00"
    assert progress_line("pretrain original", 0, 1500, 0.0, None) == "pretrain original: 0/1500 (0%), -/s, elapsed 0:00:00, ETA -"
    assert progress_line("index shards", 4, 4, 2.0, None) == "index shards: 4/4 (100%), -/s, elapsed 0:00:02, ETA 0:00:00"


def test_the_throttle_writes_the_first_then_one_per_interval_and_the_last():
    t = Throttle(every=10.0)
    assert t.due(0.0, 0, 100)  # the first
    assert not t.due(3.0, 10, 100) and t.held
    assert not t.due(9.9, 20, 100)
    assert t.due(10.0, 30, 100) and not t.held
    assert not t.due(12.0, 40, 100)
    assert t.due(13.0, 100, 100)  # the last, whenever it comes
    assert not t.due(30.0, 100, 100)  # the same state is not written twice


def test_the_interval_comes_from_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("RETRACK_PROGRESS_INTERVAL", raising=False)
    assert progress_interval() == 10.0
    monkeypatch.setenv("RETRACK_PROGRESS_INTERVAL", "0.5")
    assert progress_interval() == 0.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("RETRACK_PROGRESS_INTERVAL", bad)
        with pytest.raises(InputError, match="RETRACK_PROGRESS_INTERVAL"):
            progress_interval()


@pytest.fixture
def log_console(monkeypatch):
    """The console as it is when stderr is a pipe or a file (pytest may run on a terminal)."""
    monkeypatch.setattr(console, "is_interactive", False)


def _lines(err: str) -> list[re.Match]:
    return [m for m in map(LINE.match, err.splitlines()) if m]


def test_a_stage_in_a_log_writes_bounded_plain_lines_per_part(log_console, monkeypatch, capsys):
    monkeypatch.setenv("RETRACK_PROGRESS_INTERVAL", "60")
    with stage_progress("pretrain") as progress:
        for step in range(1, 1501):
            progress("original", step, 1500, f"loss {1 / step:.3g}")
        for step in range(1, 701):
            progress("retrained", step, 1500)
    lines = _lines(capsys.readouterr().err)
    # Each part: its first update and its last; the retrained part stopped early, and the close
    # writes where it stopped.
    assert [(m["label"], m["done"], m["total"]) for m in lines] == [
        ("pretrain original", "1", "1500"), ("pretrain original", "1500", "1500"),
        ("pretrain retrained", "1", "1500"), ("pretrain retrained", "700", "1500"),
    ]


def test_with_no_interval_every_update_is_a_line(log_console, monkeypatch, capsys):
    monkeypatch.setenv("RETRACK_PROGRESS_INTERVAL", "0")
    with stage_progress("unlearn") as progress:
        for step in range(1, 4):
            progress("steps", step, 3)
    err = capsys.readouterr().err
    assert [m["done"] for m in _lines(err)] == ["1", "2", "3"]
    assert re.search(r"unlearn steps: 3/3 \(100%\), ([\d.]+|-)/(s|min), elapsed 0:00:00, ETA 0:00:00$", err.strip())
