"""Every method under the same budget on the embedded benchmark -> benchmarks/results/methods.json.

    python benchmarks/methods.py            # full: 3000-step pretraining, 2000 samples per model
    python benchmarks/methods.py --quick    # a few minutes on 2 cores
    python benchmarks/methods.py --quick --samples 2000 --steps 30 --lr 1.2e-4 \
        --retrack-lambda 0.025 --retrack-k 30 --retrack-lambdas "" --seeds 1000,2000,3000 \
        --out benchmarks/results/methods_tuned.json   # the tuned recipe, on seeds it was not tuned on

Each method starts from the same original model, trains with the same steps, batch, learning rate
and seed, and is scored on the same seeds as the original (paired integrity).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from retrack.benchmark import BenchmarkInfo
from retrack.config import MethodConfig, TrainConfig
from retrack.corpus import read_corpus, read_forget_ids
from retrack.evaluation import build_reference, evaluate_model
from retrack.metrics import load_classifier
from retrack.models import load_pixel_model
from retrack.pretrain import ensure_pretrained
from retrack.unlearn import run_unlearning, split_for_unlearning
from retrack.workspace import Workspace

RESULTS = Path(__file__).parent / "results"

# Method settings for the 8x8 digits benchmark. Budget and optimiser follow the paper's MNIST row
# (50 steps, batch 128, AdamW lr 5e-5); lambda is tuned for ReTrack (see README), the baselines use
# their published defaults.
METHODS = {
    "retrack": {"lambda": 0.05, "k": 10},
    "vanilla": {},
    "neggrad": {},
    "erasediff": {"eta": 1e-3},
    "siss": {"lambda": 0.5, "scale": 5.0},
}
KEYS = ("forget_frequency", "frechet_distance", "integrity", "forget_loss", "wall_seconds")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quick pretraining preset and 500 samples per model")
    ap.add_argument("--samples", type=int, default=None, help="samples per model (default 2000, quick 500)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--retrack-lambda", type=float, default=METHODS["retrack"]["lambda"], help="ReTrack's lambda")
    ap.add_argument("--retrack-k", type=int, default=METHODS["retrack"]["k"], help="ReTrack's K")
    ap.add_argument("--seeds", default="0", help="comma-separated sampling seeds, one sample set each (batch b of a set uses seed + b, so "
                                                 "keep them >= samples/500 apart); every model is scored on every set and the figures are the "
                                                 "mean over sets, each set's beside them: the Fréchet distance of 2,000 samples moves by ~20% between sets")
    ap.add_argument("--retrack-lambdas", default="0.005,0.5", help="extra ReTrack rows at these lambdas (the paper's MNIST value and its SD value), for the lambda analysis")
    ap.add_argument("--out", type=Path, default=RESULTS / "methods.json")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "full"
    n = args.samples or (500 if args.quick else 2000)

    ws = Workspace.default()
    pre = ensure_pretrained(ws, preset)
    info = BenchmarkInfo.load(ws.benchmark.root)
    corpus = read_corpus(ws.benchmark.corpus)
    forget_ids = read_forget_ids(ws.benchmark.forget_ids)
    ref = build_reference(corpus, forget_ids, info.forget_threshold, load_classifier(pre.classifier))
    train = TrainConfig(steps=args.steps, batch_size=128, lr=args.lr)

    methods = {**METHODS, "retrack": {"lambda": args.retrack_lambda, "k": args.retrack_k}}
    seeds = [int(x) for x in args.seeds.split(",")]
    original = load_pixel_model(pre.original)
    before = {seed: evaluate_model(original, ref, n, seed=seed) for seed in seeds}

    def scored(model, wall: float) -> dict:
        """The model's metrics on every seed set (paired with the original's samples), their mean."""
        per_seed = {seed: before[seed][0] if model is original else evaluate_model(model, ref, n, seed=seed, original_samples01=before[seed][1])[0]
                    for seed in seeds}
        mean = {k: sum(m.get(k, 0.0) for m in per_seed.values()) / len(seeds) for k in (*KEYS[:-1], "feature_integrity")}
        return mean | {"wall_seconds": wall, "per_seed": {str(seed): {k: float(m.get(k, 0.0)) for k in KEYS[:-1]} for seed, m in per_seed.items()}}

    rows: dict[str, dict] = {}
    rows["original"] = scored(original, pre.original_seconds)
    rows["retrained"] = scored(load_pixel_model(pre.retrained), pre.retrained_seconds)
    runs = [(name, name, methods[name]) for name in args.methods.split(",")]
    runs += [(f"retrack_lambda_{lam}", "retrack", {**methods["retrack"], "lambda": float(lam)}) for lam in filter(None, args.retrack_lambdas.split(","))]
    for name, method, params in runs:
        cfg = MethodConfig(name=method, params=params)
        model = load_pixel_model(pre.original)
        data = split_for_unlearning(corpus, forget_ids, cfg)
        _, secs = run_unlearning(model, data, cfg, train)
        rows[name] = scored(model, secs)
        print(f"{name:10s} " + "  ".join(f"{k}={rows[name][k]:.4g}" for k in KEYS), file=sys.stderr, flush=True)

    result = {
        "benchmark": {"name": info.name, "corpus_size": info.corpus_size, "forget_count": info.forget_count, "image": f"{info.image_size}x{info.image_size}x{info.channels}", "threshold": info.forget_threshold},
        "settings": {"preset": preset, "samples_per_model": n, "sampling_seeds": seeds, "steps": args.steps, "batch_size": 128, "lr": args.lr, "methods": {name: {"method": method, **params} for name, method, params in runs}},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join(["python benchmarks/methods.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {name: {k: float(m[k]) for k in KEYS if k in m} | {"feature_integrity": float(m.get("feature_integrity", 0.0)), "per_seed": m["per_seed"]}
                   for name, m in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
