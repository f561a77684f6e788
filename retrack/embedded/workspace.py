"""Where the embedded default keeps its cached artifacts (benchmark corpus, pretrained models).

Everything is keyed by the configuration that produced it, and written atomically, so a cached
artifact is reused only when it is complete and was made by the same settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from retrack.embedded.benchmark import BenchmarkPaths


def retrack_home() -> Path:
    return Path(os.environ.get("RETRACK_HOME", Path.home() / ".cache" / "retrack")).expanduser()


@dataclass(frozen=True)
class Workspace:
    root: Path
    scenario: str = "digits"

    @classmethod
    def default(cls, scenario: str = "digits") -> "Workspace":
        return cls(retrack_home(), scenario)

    @property
    def benchmark(self) -> BenchmarkPaths:
        return BenchmarkPaths(self.root / "benchmarks" / self.scenario)

    def model_dir(self, which: str, preset: str) -> Path:
        """`which`: original | retrained | classifier; `preset`: the pretraining preset's name."""
        return self.root / "models" / self.scenario / preset / which
