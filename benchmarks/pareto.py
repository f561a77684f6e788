"""The Pareto fronts of ReTrack, SISS and EraseDiff on the embedded benchmark under the same trial
budget -> benchmarks/results/pareto.json and pareto.png.

    python benchmarks/pareto.py                 # quick preset, 8 trials per method
    python benchmarks/pareto.py --trials 12 --preset full

Each method is searched by `retrack tune`'s own machinery (pipelines.tune.search: Ray Tune trials,
each a Ray Train run, Optuna's multi-objective TPE sampler, the method's published default as the
first trial) over its own hyperparameters plus the learning rate, with the same steps, batch,
trial budget and sampling seeds. Fronts are compared by dominance and by hypervolume (the area
they dominate below the original model's forget frequency and twice its Fréchet distance).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.tune import search
from retrack.embedded.benchmark import BenchmarkInfo
from retrack.tuning.plot import plot_fronts
from retrack.embedded.pretrain import ensure_pretrained
from retrack.config.spec import load_spec
from retrack.tuning.search import OBJECTIVES, TrialOutcome, dominates
from retrack.embedded.workspace import Workspace

RESULTS = Path(__file__).parent / "results"

# Each method's published default is its first trial; the ranges span it by a decade or more.
SEARCHES = {
    "retrack": {"params": {"lambda": 0.05, "k": 10},
                "space": {"lambda": {"low": 0.005, "high": 0.3, "log": True}, "k": {"low": 2, "high": 40, "log": True}}},
    "siss": {"params": {"lambda": 0.5, "scale": 5.0},
             "space": {"lambda": {"low": 0.05, "high": 0.95}, "scale": {"low": 0.5, "high": 50.0, "log": True}}},
    "erasediff": {"params": {"eta": 1e-3},
                  "space": {"eta": {"low": 1e-5, "high": 1e-1, "log": True}}},
}
LR_RANGE = {"low": 1e-5, "high": 3e-4, "log": True}


def hypervolume(front: list[TrialOutcome], ref: tuple[float, float]) -> float:
    """Area dominated by the front inside the box below `ref` (2 objectives, both minimised)."""
    pts = sorted((o.point for o in front if o.point[0] < ref[0] and o.point[1] < ref[1]))
    area, prev_fd = 0.0, ref[1]
    for freq, fd in pts:
        if fd < prev_fd:
            area += (ref[0] - freq) * (prev_fd - fd)
            prev_fd = fd
    return area


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", help="pretraining preset of the original model")
    ap.add_argument("--trials", type=int, default=8, help="trial budget per method")
    ap.add_argument("--samples", type=int, default=500, help="samples per trial")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--methods", default=",".join(SEARCHES))
    ap.add_argument("--out", type=Path, default=RESULTS / "pareto.json")
    args = ap.parse_args(argv)

    ws = Workspace.default()
    pre = ensure_pretrained(ws, args.preset)
    info = BenchmarkInfo.load(ws.benchmark.root)
    work = Path(tempfile.mkdtemp(prefix="pareto-"))
    results, original, started = {}, None, time.perf_counter()
    for method in args.methods.split(","):
        cfg = SEARCHES[method]
        spec_path = work / f"{method}.yaml"
        spec_path.write_text(yaml.safe_dump({
            "request_id": f"pareto-{method}",
            "model": {"uri": str(pre.original)},
            "corpus": {"uri": str(ws.benchmark.corpus)},
            "forget": {"file": str(ws.benchmark.forget_ids), "duplicates": "add"},
            "method": {"name": method, "params": cfg["params"]},
            "train": {"steps": args.steps, "batch_size": 128, "lr": 5e-5},
            "evaluation": {"forget_threshold": info.forget_threshold},
            "storage": {"root": str(work / "jobs")},
            "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "registered_model": "pareto"},
            "tune": {"search": "optuna", "trials": args.trials, "num_samples": args.samples, "seed": 0,
                     "space": {**cfg["space"], "lr": LR_RANGE}},
        }))
        t0 = time.perf_counter()
        found = search(load_spec(spec_path))
        original = found.original
        results[method] = {"outcomes": found.outcomes, "front": found.front, "seconds": time.perf_counter() - t0}

    ref = (original["forget_frequency"], 2 * original["frechet_distance"])
    fronts = {m: r["front"] for m, r in results.items()}
    summary = {}
    for m, r in results.items():
        others = [o for n, f in fronts.items() if n != m for o in f]
        summary[m] = {
            "trials": len(r["outcomes"]),
            "ok": sum(o.status == "ok" for o in r["outcomes"]),
            "stopped_early": sum(o.status in ("collapsed", "diverged") for o in r["outcomes"]),
            "front_size": len(r["front"]),
            "front_points_dominated_by_other_methods": sum(any(dominates(p, o) for p in others) for o in r["front"]),
            "hypervolume": hypervolume(r["front"], ref),
            "best_fd_with_frequency_at_most_10pct": min((o.metrics["frechet_distance"] for o in r["front"] if o.metrics["forget_frequency"] <= 0.1 * ref[0]), default=None),
            "search_seconds": round(r["seconds"], 1),
        }
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_fronts({m: r["outcomes"] for m, r in results.items()}, png, original={k: original[k] for k in OBJECTIVES},
                title=f"embedded benchmark, {args.trials} trials per method")
    out = {
        "benchmark": {"name": info.name, "corpus_size": info.corpus_size, "forget_count": info.forget_count, "preset": args.preset},
        "settings": {"trials_per_method": args.trials, "samples_per_trial": args.samples, "steps": args.steps, "batch_size": 128,
                     "search": "optuna TPE (multi-objective), default as first trial", "spaces": {m: {**SEARCHES[m]["space"], "lr": LR_RANGE} for m in results}},
        "objectives": list(OBJECTIVES),
        "original": {k: original[k] for k in OBJECTIVES},
        "hypervolume_reference": {"forget_frequency": ref[0], "frechet_distance": ref[1]},
        "summary": summary,
        "methods": {m: {"front": [o.to_dict() for o in r["front"]], "trials": [o.to_dict() for o in r["outcomes"]]} for m, r in results.items()},
        "plot": png.name,
        "machine": {"platform": platform.platform()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))
    return args.out


if __name__ == "__main__":
    main()
