"""A run whose stderr is a pipe (as under Kubernetes or CI) logs each long stage's progress as plain
lines at a bounded rate, Ray Data's own progress with them: `retrack index build` on a corpus of
80 files (one progress update per file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.fixtures.corpora import clustered_images, write_corpus

INTERVAL = 0.2
FILES, ROWS = 80, 100
LINE = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<label>index (encode|shards)): (?P<done>\d+)/(?P<total>\d+) \(\d+%\), "
    r"(?P<rate>[\d.]+/(s|min)|-/s), elapsed \d+:\d\d:\d\d, ETA (?P<eta>\d+:\d\d:\d\d|-)$"
)


def _piped_index_build(tmp_path: Path, *options: str) -> tuple[str, list[re.Match]]:
    write_corpus(tmp_path / "corpus", clustered_images(FILES * ROWS, size=16), shard_size=ROWS)
    exe = Path(sys.executable).with_name("retrack")
    proc = subprocess.run([str(exe), "index", "build", str(tmp_path / "corpus"), str(tmp_path / "index"), *options],
                          env={**os.environ, "RETRACK_PROGRESS_INTERVAL": str(INTERVAL)},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr, [m for m in map(LINE.match, proc.stderr.splitlines()) if m]


def _check_lines(lines: list[re.Match]) -> None:
    encode = [m for m in lines if m["label"] == "index encode"]
    total = FILES * ROWS
    # The start, then the rows as files finish, then all of them; rates and ETAs once known.
    assert encode[0]["done"] == "0" and encode[-1]["done"] == str(total), [m.string for m in encode]
    assert all(m["total"] == str(total) for m in encode)
    assert all(m["rate"] != "-/s" and m["eta"] != "-" for m in encode[1:])
    assert encode[-1]["eta"] == "0:00:00"
    shards = [m for m in lines if m["label"] == "index shards"]
    assert shards and shards[-1]["done"] == shards[-1]["total"]
    # Bounded: one line per interval at most, but for the last.
    assert len(encode) >= 2
    for a, b in zip(encode, encode[1:]):
        if b["done"] != b["total"]:
            gap = (datetime.strptime(b["stamp"], "%Y-%m-%d %H:%M:%S,%f") - datetime.strptime(a["stamp"], "%Y-%m-%d %H:%M:%S,%f")).total_seconds()
            assert gap >= INTERVAL - 0.002, (a.string, b.string)


def test_a_piped_index_build_logs_its_progress(tmp_path):
    err, lines = _piped_index_build(tmp_path, "--local")
    _check_lines(lines)
    assert "\x1b[" not in err  # no terminal control codes in a log


@pytest.mark.slow
def test_a_piped_index_build_on_ray_logs_its_progress_and_ray_datas(tmp_path):
    err, lines = _piped_index_build(tmp_path, "--num-cpus", "2")
    _check_lines(lines)
    # Ray Data's own lines: the dataset's total and its operator's progress.
    assert re.search(r"INFO logging_progress.py:\d+ -- Total Progress: \d+/", err), err[-3000:]
    assert re.search(r"INFO logging_progress.py:\d+ -- MapBatches\(_encode_files\): \d+/\d+", err), err[-3000:]
