"""The request's report: before/after sample grid (look-alikes redacted), metrics plot, markdown
and JSON summaries. Only numbers and generated samples that are not copies of forgotten items go in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from retrack.storage.atomic import atomic_directory
from retrack.evaluation.report_images import save_before_after
from retrack.evaluation.verdict import Verdict

PLOTTED = ("forget_frequency", "frechet_distance", "forget_loss", "integrity")
MARKDOWN_COLUMNS = ("forget_frequency", "frechet_distance", "integrity", "integrity_ratio", "feature_integrity", "forget_loss")


def _plot(metrics: dict[str, dict], path: Path, plotted: Sequence[str] = PLOTTED) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics)
    fig, axes = plt.subplots(1, len(plotted), figsize=(3.2 * len(plotted), 3))
    for ax, key in zip(axes, plotted):
        vals = [metrics[n].get(key, np.nan) for n in names]
        ax.bar(names, vals, color=["#888", "#2a7", "#37c", "#c73"][: len(names)])
        ax.set_title(key.replace("_", " "))
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: str | Path,
    request_id: str,
    metrics: dict[str, dict],
    verdict: Verdict,
    membership: dict | None,
    before01: np.ndarray,
    after01: np.ndarray,
    redact: np.ndarray,
    context: dict,
    columns: Sequence[str] | None = None,
    details: dict[str, list[dict]] | None = None,
) -> Path:
    """Write the report atomically into `out_dir` (a temp dir moved into place when complete).
    `columns`: the metrics tabulated and plotted (default: the pixel DDPM's); `details`: further
    tables (lists of rows of numbers, e.g. per-prompt figures), in the JSON and the markdown."""
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        save_before_after(before01, after01, redact, tmp / "samples_before_after.png")
        _plot(metrics, tmp / "metrics.png", columns or PLOTTED)
        per_item = None
        if membership is not None:
            per_item = [{"item": n, "loss_percentile_among_non_members": round(float(p), 4), "remembered": bool(r)} for n, (p, r) in enumerate(zip(membership["percentiles"], membership["remembered"]))]
        summary = {
            "request_id": request_id,
            "verdict": verdict.to_dict(),
            "metrics": metrics,
            "membership": None if membership is None else {"alpha": membership["alpha"], "threshold": membership["threshold"], "n_reference": membership["n_reference"], "items": per_item},
            "redacted_tiles": int(redact.sum()),
            **({"details": details} if details else {}),
            **context,
        }
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, default=float))
        (tmp / "report.md").write_text(_markdown(request_id, metrics, verdict, per_item, context, columns or MARKDOWN_COLUMNS, details or {}))
    return out


def _markdown(request_id: str, metrics: dict[str, dict], verdict: Verdict, per_item: list | None, context: dict,
              cols: Sequence[str], details: dict[str, list[dict]]) -> str:
    lines = [
        f"# Deletion request `{request_id}`: **{verdict.label}**",
        "",
        *(f"- {r}" for r in verdict.reasons),
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join("-" if m.get(c) is None else f"{m[c]:.4g}" for c in cols) + " |")
    if per_item is not None:
        remembered = sum(i["remembered"] for i in per_item)
        lines += ["", f"Per-item membership test: {remembered} of {len(per_item)} forgotten item(s) still look like members "
                  "(denoising loss below the non-members' alpha-quantile)."]
    for title, rows in details.items():
        if rows:
            keys = list(rows[0])
            lines += ["", f"{title.replace('_', ' ')}:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    lines += ["", "![same-seed samples, original left, unlearned right; grey tiles are redacted look-alikes](samples_before_after.png)", "", "![metrics](metrics.png)", ""]
    lines += [f"- {k}: `{v}`" for k, v in context.items()]
    return "\n".join(lines) + "\n"
