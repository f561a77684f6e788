"""`retrack demo`: the embedded default end to end, zero configuration, in one process."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.progress import console, stage_bar
from retrack.benchmark import BenchmarkInfo
from retrack.config import MethodConfig, TrainConfig
from retrack.corpus import read_corpus, read_forget_ids
from retrack.evaluation import build_reference, evaluate_model
from retrack.metrics import load_classifier, nearest_forget_distance
from retrack.models import load_pixel_model, save_pixel_model
from retrack.pretrain import PRESETS, ensure_pretrained
from retrack.report_images import save_before_after
from retrack.unlearn import run_unlearning, split_for_unlearning
from retrack.workspace import Workspace

# ReTrack settings for the embedded digits benchmark (see README "Results" for how they were chosen).
DEMO_METHOD = MethodConfig(name="retrack", params={"lambda": 0.05, "k": 10})
DEMO_TRAIN = TrainConfig(steps=50, batch_size=128, lr=5e-5)


@dataclass
class DemoSettings:
    quick: bool
    out: Path
    method: MethodConfig = DEMO_METHOD
    train: TrainConfig = DEMO_TRAIN

    @property
    def preset(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def n_samples(self) -> int:
        return 500 if self.quick else 2000


def run_demo(settings: DemoSettings, ws: Workspace | None = None) -> dict:
    ws = ws or Workspace.default()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    steps = PRESETS[settings.preset].steps
    with stage_bar("pretrain (cached)", 2 * steps) as advance:
        offsets = {"original": 0, "retrained": steps}
        pre = ensure_pretrained(ws, settings.preset, progress=lambda w, s, _n: advance(offsets[w] + s, w))
        advance(2 * steps, "ready")
    info = BenchmarkInfo.load(ws.benchmark.root)
    corpus = read_corpus(ws.benchmark.corpus)
    forget_ids = read_forget_ids(ws.benchmark.forget_ids)
    data = split_for_unlearning(corpus, forget_ids, settings.method)

    model = load_pixel_model(pre.original)
    with stage_bar(f"unlearn ({settings.method.name})", settings.train.steps) as advance:
        _, unlearn_seconds = run_unlearning(model, data, settings.method, settings.train, progress=lambda s, logs: advance(s, f"loss {logs['loss']:.3g}"))
    save_pixel_model(model, out / "unlearned", metadata={"method": settings.method.model_dump(), "wall_seconds": unlearn_seconds})

    ref = build_reference(corpus, forget_ids, info.forget_threshold, load_classifier(pre.classifier))
    rows: dict[str, dict] = {}
    with stage_bar("evaluate", 3) as advance:
        original = load_pixel_model(pre.original)
        rows["original"], before = evaluate_model(original, ref, settings.n_samples)
        advance(1, "original")
        rows["retrained"], _ = evaluate_model(load_pixel_model(pre.retrained), ref, settings.n_samples, original_samples01=before)
        advance(2, "retrained")
        rows[settings.method.name], after = evaluate_model(model, ref, settings.n_samples, original_samples01=before)
        advance(3, settings.method.name)
    rows["original"]["wall_seconds"] = pre.original_seconds
    rows["retrained"]["wall_seconds"] = pre.retrained_seconds
    rows[settings.method.name]["wall_seconds"] = unlearn_seconds

    redact = (nearest_forget_distance(before[:64], ref.forget01) < ref.threshold) | (
        nearest_forget_distance(after[:64], ref.forget01) < ref.threshold
    )
    grid_path = save_before_after(before[:64], after[:64], redact, out / "samples_before_after.png")
    summary = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "benchmark": info.name, "metrics": rows, "grid": str(grid_path)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print_table(rows)
    console.print(f"before/after samples: {grid_path}\nmetrics: {out / 'metrics.json'}")
    return summary


def print_table(rows: dict[str, dict]) -> None:
    from rich.table import Table

    table = Table(title="embedded benchmark (digits with a planted forget image)")
    cols = ["forget_frequency", "frechet_distance", "integrity", "forget_loss", "wall_seconds"]
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.4g}" if isinstance(m.get(c), (int, float)) and not np.isnan(m[c]) else "-" for c in cols))
    console.print(table)
