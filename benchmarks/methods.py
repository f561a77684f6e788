"""Every method under the same budget on the embedded benchmark -> benchmarks/results/methods.json.

    python benchmarks/methods.py    # the headline table of the README (about 20 min on 2 cores)

The defaults are ReTrack's recipe on the quick preset (retrack/embedded/demo.py: K = the whole
retain set, t_min 100, lambda 0.1, lr 7e-5, 32 forget + 128 retain samples for 60 updates), every
method at that budget, one training seed, three paired sampling sets of 2,000, and the retrained
gold standard trained anew in the same run, so that the wall-time ratio is measured side by side.

The records of docs/experiments/embedded-benchmark.md were made with the commands below, under the
defaults of their time: `--quick` meant the quick preset with 500 samples (now `--preset quick`,
the default), and unset options meant 50 updates, lr 5e-5, lambda 0.05, K 10, t_min 0, the forget
batch equal to --batch-size, one sampling set (seed 0), extra ReTrack rows at lambda 0.005 and 0.5,
and the retrained model's time from when it was cached. Each JSON's `settings` holds every value.

    python benchmarks/methods.py --quick --samples 2000 --steps 30 --lr 1.2e-4 \
        --retrack-lambda 0.025 --retrack-k 30 --retrack-lambdas "" --seeds 1000,2000,3000 \
        --out benchmarks/results/methods_tuned.json   # the tuned recipe, on seeds it was not tuned on
    # the same, each method trained with 3 seeds (methods_tuned_seeds.json: --methods retrack,vanilla,siss
    # --train-seeds 0,1,2); t_min (methods_t_min.json):
    python benchmarks/methods.py --quick --samples 2000 --steps 40 --lr 4e-5 --retrack-lambda 0.1 \
        --retrack-k 30 --retrack-t-min 100 --retrack-lambdas "" --methods retrack,vanilla \
        --seeds 1000,2000,3000 --train-seeds 0,1,2 --out benchmarks/results/methods_t_min.json
    # K 30 at t_min 100 and lr 7e-5, every method at that budget (methods_t_min_lr7e-5.json):
    python benchmarks/methods.py --quick --samples 2000 --steps 40 --lr 7e-5 --retrack-lambda 0.1 \
        --retrack-k 30 --retrack-t-min 100 --retrack-lambdas "" --seeds 1000,2000,3000 \
        --train-seeds 0,1,2 --out benchmarks/results/methods_t_min_lr7e-5.json
    # the same recipe, --methods retrack,vanilla, on fresh sampling sets (--seeds 4000,5000,6000,
    # methods_t_min_lr7e-5_fresh.json), with 8 training seeds (--train-seeds 0,...,7,
    # methods_t_min_lr7e-5_fresh8.json) and on the full preset (no --quick, methods_t_min_lr7e-5_full.json)
    # K = the whole retain set (1,616 items), every method at its budget, 8 training seeds
    # (docs/experiments/embedded-benchmark.md, "Eight training seeds": panel A, methods_k_all.json):
    python benchmarks/methods.py --quick --samples 2000 --steps 40 --lr 7e-5 --retrack-lambda 0.1 \
        --retrack-k 1616 --retrack-t-min 100 --retrack-lambdas "" --seeds 4000 \
        --train-seeds 0,1,2,3,4,5,6,7 --out benchmarks/results/methods_k_all.json
    # ReTrack alone, rerun after neighbour sets were stored once per batch: the same with
    # --methods retrack --out benchmarks/results/methods_k_all_shared_sets.json
    # fewer updates (docs/experiments/embedded-benchmark.md, "Wall time against retraining"): the same with --methods retrack
    # --steps 36 or 32, on panel A (as above) and panel B (--seeds 1000 --train-seeds 10,...,17),
    # --out benchmarks/results/methods_k_all_steps{36,32}_panel_{a,b}.json
    # K 1,616 on the full preset (docs/experiments/embedded-benchmark.md, "does not carry over"): no --quick, --methods retrack,vanilla,
    # --lr 7e-5 or 3e-5, --out benchmarks/results/methods_k_all_full_lr{7e-5,3e-5}.json
    # the held-out panel C (methods_k_all_panel_c.json):
    python benchmarks/methods.py --quick --samples 2000 --steps 40 --lr 7e-5 --retrack-lambda 0.07 \
        --retrack-k 1616 --retrack-t-min 100 --retrack-lambdas 0.1 --methods retrack,vanilla --seeds 7000 \
        --train-seeds 20,21,22,23,24,25,26,27 --out benchmarks/results/methods_k_all_panel_c.json
    # six held-out sampling sets, 95% intervals under "vs_original" (methods_k_all_six_sets.json; the
    # file merges this command's parts, run separately: retrack at 0.1 and 0.07, at 0.05, and vanilla):
    python benchmarks/methods.py --quick --samples 2000 --steps 40 --lr 7e-5 --retrack-k 1616 \
        --retrack-t-min 100 --methods retrack,vanilla --seeds 10000,13000,16000,19000,22000,25000 \
        --train-seeds 30,31,32,33,34,35,36,37 --retrack-lambda 0.1 --retrack-lambdas 0.07,0.05
    # a forget batch of its own (docs/experiments/embedded-benchmark.md, "A forget batch of its own"): 32 forget + 128 retain samples
    # for 60 updates, on fresh sets and seeds (methods_forget_batch_32.json); the 40-update recipe on the
    # same panel is the same command with --steps 40, --retrack-lambdas "" and no --forget-batch-size
    # (methods_forget_batch_128.json)
    python benchmarks/methods.py --quick --samples 2000 --steps 60 --forget-batch-size 32 --lr 7e-5 \
        --retrack-k 1616 --retrack-t-min 100 --methods retrack --seeds 28000,31000,34000,37000,40000,43000 \
        --train-seeds 40,41,42,43,44,45,46,47 --retrack-lambda 0.1 --retrack-lambdas 0.07 \
        --out benchmarks/results/methods_forget_batch_32.json
    # 56 updates at lambda 0.07 (methods_forget_batch_32_steps56.json): the same with --steps 56
    # --retrack-lambda 0.07 --retrack-lambdas ""

Each method starts from the same original model, trains with the same steps, batch, learning rate
and training seeds, and is scored on the same sampling seeds as the original (paired integrity).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from retrack.embedded.benchmark import BenchmarkInfo
from retrack.config.train import MethodConfig, TrainConfig
from retrack.data.corpus import read_corpus
from retrack.data.forget import read_forget_ids
from retrack.evaluation.pixel import build_reference, evaluate_model
from retrack.methods import method_class
from retrack.evaluation.metrics import load_classifier
from retrack.models.pixel import load_pixel_model
from retrack.embedded.demo import RECIPE_METHOD, RECIPE_TRAIN
from retrack.embedded.pretrain import PRESETS, ensure_pretrained, pretrain
from retrack.evaluation.stats import ratio_of_means
from retrack.training.loop import run_unlearning, split_for_unlearning
from retrack.embedded.workspace import Workspace

RESULTS = Path(__file__).parent / "results"

# Method settings for the 8x8 digits benchmark: ReTrack's recipe; the baselines use their
# published defaults.
METHODS = {
    "retrack": RECIPE_METHOD["params"],
    "vanilla": {},
    "neggrad": {},
    "erasediff": {"eta": 1e-3},
    "siss": {"lambda": 0.5, "scale": 5.0},
}
KEYS = ("forget_frequency", "frechet_distance", "integrity", "forget_loss", "wall_seconds")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="pretraining preset of the original (the recipe is the quick one's)")
    ap.add_argument("--samples", type=int, default=2000, help="samples per model and sampling set")
    ap.add_argument("--steps", type=int, default=RECIPE_TRAIN["steps"])
    ap.add_argument("--lr", type=float, default=RECIPE_TRAIN["lr"])
    ap.add_argument("--batch-size", type=int, default=RECIPE_TRAIN["batch_size"], help="per branch (forget and retain) per update")
    ap.add_argument("--forget-batch-size", type=int, default=RECIPE_TRAIN["forget_batch_size"],
                    help="forget-branch batch per update, when it should differ from --batch-size (siss pairs its samples and keeps --batch-size)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--retrack-lambda", type=float, default=METHODS["retrack"]["lambda"], help="ReTrack's lambda")
    ap.add_argument("--retrack-k", type=int, default=METHODS["retrack"]["k"], help="ReTrack's K")
    ap.add_argument("--retrack-t-min", type=int, default=METHODS["retrack"]["t_min"], help="ReTrack's smallest forget-branch timestep")
    ap.add_argument("--seeds", default="0,1000,2000", help="comma-separated sampling seeds, one sample set each (batch b of a set uses seed + b, so "
                                                 "keep them >= samples/500 apart); every model is scored on every set (per_run in the JSON) and the figures are the "
                                                 "mean over runs: the Fréchet distance of 2,000 samples moves by ~10%% (one standard deviation) between independent sets")
    ap.add_argument("--train-seeds", default="0", help="comma-separated training seeds: each method is trained once per seed and its figures are "
                                                       "the mean over seeds x sets (the reference averages 10 seeds); one seed's Fréchet distance "
                                                       "moves by 20-100%% between seeds at the same settings")
    ap.add_argument("--retrack-lambdas", default="", help="extra ReTrack rows at these lambdas (e.g. 0.005,0.5: the paper's MNIST and SD values), for the lambda analysis")
    ap.add_argument("--out", type=Path, default=RESULTS / "methods.json")
    args = ap.parse_args(argv)
    preset, n = args.preset, args.samples

    ws = Workspace.default()
    pre = ensure_pretrained(ws, preset, models=("original",))
    info = BenchmarkInfo.load(ws.benchmark.root)
    corpus = read_corpus(ws.benchmark.corpus)
    forget_ids = read_forget_ids(ws.benchmark.forget_ids)
    ref = build_reference(corpus, forget_ids, info.forget_threshold, load_classifier(pre.classifier))
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, forget_batch_size=args.forget_batch_size, lr=args.lr)

    methods = {**METHODS, "retrack": {"lambda": args.retrack_lambda, "k": args.retrack_k, "t_min": args.retrack_t_min}}
    seeds = [int(x) for x in args.seeds.split(",")]
    train_seeds = [int(x) for x in args.train_seeds.split(",")]
    original = load_pixel_model(pre.original)
    before = {seed: evaluate_model(original, ref, n, seed=seed) for seed in seeds}

    def scored(models: dict, walls: list[float]) -> dict:
        """Every (training seed, sampling set) run's metrics, paired with the original's samples on
        that set; the figures are their mean, the wall time the median over training seeds.
        `models` maps a training seed (None: not trained here) to its model."""
        runs = [{"train_seed": ts, "sampling_seed": seed,
                 **{k: float(v) for k, v in (before[seed][0] if model is original else
                                             evaluate_model(model, ref, n, seed=seed, original_samples01=before[seed][1])[0]).items()}}
                for ts, model in models.items() for seed in seeds]
        mean = {k: sum(r.get(k, 0.0) for r in runs) / len(runs) for k in (*KEYS[:-1], "feature_integrity")}
        return mean | {"wall_seconds": statistics.median(walls), "per_run": runs,
                       "vs_original": None if models.get(None) is original else vs_original(runs)}

    def vs_original(runs: list[dict]) -> dict:
        """The acceptance lines' ratios to the original (mean over seeds x sets) with 95% bootstrap
        intervals over both: one set of 2,000 samples moves the Fréchet distance by ~10%."""
        ts = sorted({r["train_seed"] for r in runs}, key=str)
        table = {(r["train_seed"], r["sampling_seed"]): r for r in runs}
        out = {}
        for key in ("forget_frequency", "frechet_distance"):
            model = [[table[t, s][key] for s in seeds] for t in ts]
            base = [before[s][0][key] for s in seeds]
            out[key] = ratio_of_means(model, base).to_dict() if sum(base) > 0 else None
        return out

    rows: dict[str, dict] = {}
    rows["original"] = scored({None: original}, [pre.original_seconds])
    # The gold standard, trained in this run on the retained data only: the methods' wall times
    # below are measured beside its training time, on the same machine at the same time.
    keep = np.setdiff1d(np.arange(len(corpus)), corpus.index_of(forget_ids))
    retrained, retrain_seconds = pretrain(corpus.images[keep], PRESETS[preset])
    rows["retrained"] = scored({None: retrained}, [retrain_seconds])
    runs = [(name, name, methods[name]) for name in args.methods.split(",")]
    runs += [(f"retrack_lambda_{lam}", "retrack", {**methods["retrack"], "lambda": float(lam)}) for lam in filter(None, args.retrack_lambdas.split(","))]
    for name, method, params in runs:
        cfg = MethodConfig(name=method, params=params)
        data = split_for_unlearning(corpus, forget_ids, cfg)
        method_train = train.model_copy(update={"forget_batch_size": None}) if method_class(method).requirements.paired else train
        models, walls = {}, []
        for ts in train_seeds:
            models[ts] = load_pixel_model(pre.original)
            _, secs = run_unlearning(models[ts], data, cfg, method_train.model_copy(update={"seed": ts}))
            walls.append(secs)
        rows[name] = scored(models, walls) | {"wall_vs_retraining": statistics.median(walls) / retrain_seconds}
        print(f"{name:10s} " + "  ".join(f"{k}={rows[name][k]:.4g}" for k in KEYS), file=sys.stderr, flush=True)

    result = {
        "benchmark": {"name": info.name, "corpus_size": info.corpus_size, "forget_count": info.forget_count, "image": f"{info.image_size}x{info.image_size}x{info.channels}", "threshold": info.forget_threshold},
        "settings": {"preset": preset, "samples_per_model": n, "sampling_seeds": seeds, "training_seeds": train_seeds, "steps": args.steps, "batch_size": args.batch_size, "forget_batch_size": args.forget_batch_size, "lr": args.lr, "methods": {name: {"method": method, **params} for name, method, params in runs}},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join(["python benchmarks/methods.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {name: {k: float(m[k]) for k in KEYS if k in m} | {"feature_integrity": float(m.get("feature_integrity", 0.0)),
                                                                       "vs_original": m["vs_original"], "per_run": m["per_run"]}
                         | ({"wall_vs_retraining": m["wall_vs_retraining"]} if "wall_vs_retraining" in m else {})
                   for name, m in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
