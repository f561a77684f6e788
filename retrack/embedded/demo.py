"""The embedded default's job spec: `retrack demo` runs it, a test or a notebook can load it."""

from __future__ import annotations

from retrack.config.spec import JobSpec
from retrack.embedded.workspace import Workspace

# ReTrack on the embedded digits: the paper's MNIST budget (50 steps, batch 128, lr 5e-5) with
# lambda 0.05 for 8x8 images (docs/results.md).
DEMO_METHOD = {"name": "retrack", "params": {"lambda": 0.05, "k": 10}}
DEMO_TRAIN = {"steps": 50, "batch_size": 128, "lr": 5e-5}


def demo_spec(ws: Workspace, quick: bool) -> JobSpec:
    preset = "quick" if quick else "full"
    bench = ws.benchmark
    return JobSpec.model_validate(
        {
            "request_id": f"demo-{ws.scenario}-{preset}",
            "model": {"kind": "pixel-ddpm", "uri": str(ws.model_dir("original", preset)), "registered_name": f"{ws.scenario}-ddpm-{preset}"},
            "corpus": {"uri": str(bench.corpus)},
            "forget": {"file": str(bench.forget_ids), "duplicates": "add"},
            "method": DEMO_METHOD,
            "train": DEMO_TRAIN,
            "evaluation": {"num_samples": 500 if quick else 2000, "holdout_uri": str(bench.holdout)},
            "storage": {"root": str(ws.root / "jobs")},
            "mlflow": {
                "tracking_uri": f"sqlite:///{ws.root / 'mlflow.db'}",
                "registered_model": f"{ws.scenario}-ddpm-{preset}",
                "artifact_location": (ws.root / "mlartifacts").as_uri(),
            },
        }
    )
