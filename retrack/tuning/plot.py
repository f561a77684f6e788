"""The Pareto-front plot: forget frequency against Fréchet distance, one colour per method; every
trial as a dot, each method's front as a line, the original model and the chosen trial marked."""

from __future__ import annotations

from pathlib import Path

from retrack.tuning.search import TrialOutcome, pareto_front

COLOURS = ("#2a7", "#37c", "#c73", "#a4c", "#888")


def plot_fronts(outcomes: dict[str, list[TrialOutcome]], path: str | Path, original: dict[str, float] | None = None,
                chosen: TrialOutcome | None = None, title: str = "forgetting vs quality damage") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for colour, (name, trials) in zip(COLOURS, outcomes.items()):
        ok = [o for o in trials if o.status == "ok"]
        ax.scatter([o.metrics["forget_frequency"] for o in ok], [o.metrics["frechet_distance"] for o in ok], s=18, alpha=0.45, color=colour)
        front = pareto_front(trials)
        ax.plot([o.metrics["forget_frequency"] for o in front], [o.metrics["frechet_distance"] for o in front],
                "-o", color=colour, label=f"{name} ({len(ok)} trials)")
    if original:
        ax.scatter([original["forget_frequency"]], [original["frechet_distance"]], marker="s", color="k", label="original")
    if chosen is not None and chosen.status == "ok":
        ax.scatter([chosen.metrics["forget_frequency"]], [chosen.metrics["frechet_distance"]], marker="*", s=180, color="gold", edgecolor="k", label="chosen", zorder=5)
    ax.set_xlabel("forget frequency (lower = forgotten)")
    ax.set_ylabel("Fréchet distance to retained data (lower = better)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
