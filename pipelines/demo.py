"""`retrack demo`: the embedded default end to end with zero configuration.

It pretrains (once, cached) the original and the retrained-from-scratch DDPMs on the embedded
digits benchmark, then runs the same chain as `retrack run` (index -> neighbours -> unlearn ->
evaluate -> register) on a local Ray instance with a local SQLite MLflow store.
"""

from __future__ import annotations

from pipelines.progress import console, stage_bar
from retrack.embedded.demo import demo_spec
from retrack.embedded.pretrain import PRESETS, ensure_pretrained
from retrack.embedded.workspace import Workspace


def run_demo(quick: bool, ws: Workspace | None = None, address: str | None = None):
    from pipelines.job import run_job

    ws = ws or Workspace.default()
    preset = "quick" if quick else "full"
    steps = PRESETS[preset].steps
    with stage_bar("pretrain (cached)", 2 * steps) as advance:
        offsets = {"original": 0, "retrained": steps}
        ensure_pretrained(ws, preset, progress=lambda w, s, _n: advance(offsets[w] + s, w))
        advance(2 * steps, "ready")
    result = run_job(demo_spec(ws, quick), address=address)
    print_summary(result)
    return result


def print_metrics(title: str, rows: dict[str, dict]) -> None:
    from rich.table import Table

    cols = ["forget_frequency", "frechet_distance", "integrity", "forget_loss"]
    table = Table(title=title)
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.4g}" if c in m else "-" for c in cols))
    console.print(table)


def print_summary(result) -> None:
    print_metrics(f"request {result.request_id}", result.metrics)
    console.print(f"verdict: [bold]{result.verdict}[/bold]\nmodel version: {result.model_version}\nreport: {result.report_uri}")
