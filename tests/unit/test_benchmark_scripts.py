"""Every benchmark script answers --help: its options are how a published figure is reproduced
(a stray `%` in an argparse help string once made `methods.py --help` crash)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def test_the_benchmark_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"knn.py", "methods.py", "pareto.py", "train.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
