"""The embedded default's job spec: `retrack demo` runs it, a test or a notebook can load it."""

from __future__ import annotations

from retrack.config.spec import JobSpec
from retrack.embedded.workspace import Workspace

# ReTrack's recipe on the embedded benchmark, the one that met every target on a held-out panel
# of the quick preset (docs/results.md): K = the whole retain set (1,616 items), t_min 100,
# lambda 0.1, lr 7e-5, 32 forget + 128 retain samples for 60 updates. It forgets on the full
# preset too; benchmarks/methods.py and wall.py default to it.
RECIPE_METHOD = {"name": "retrack", "params": {"lambda": 0.1, "k": 1616, "t_min": 100}}
RECIPE_TRAIN = {"steps": 60, "batch_size": 128, "forget_batch_size": 32, "lr": 7e-5}


def demo_spec(ws: Workspace, quick: bool) -> JobSpec:
    preset = "quick" if quick else "full"
    bench = ws.benchmark
    return JobSpec.model_validate(
        {
            "request_id": f"demo-{ws.scenario}-{preset}",
            "model": {"kind": "pixel-ddpm", "uri": str(ws.model_dir("original", preset)), "registered_name": f"{ws.scenario}-ddpm-{preset}"},
            "corpus": {"uri": str(bench.corpus)},
            "forget": {"file": str(bench.forget_ids), "duplicates": "add"},
            "method": RECIPE_METHOD,
            "train": RECIPE_TRAIN,
            "evaluation": {"num_samples": 500 if quick else 2000, "holdout_uri": str(bench.holdout)},
            "storage": {"root": str(ws.root / "jobs")},
            "mlflow": {
                "tracking_uri": f"sqlite:///{ws.root / 'mlflow.db'}",
                "registered_model": f"{ws.scenario}-ddpm-{preset}",
                "artifact_location": (ws.root / "mlartifacts").as_uri(),
            },
        }
    )
