"""ReTrack's wall time against retraining without the forget set, measured side by side in one
run; writes benchmarks/results/wall.json.

    python benchmarks/wall.py      # ReTrack's recipe (retrack/embedded/demo.py) on the quick preset

The records were made under the defaults of their time (`--quick`: the quick preset, now the
default; 40 updates; the forget batch equal to --batch-size):

    python benchmarks/wall.py --quick                      # the K = |A_r| recipe (docs/experiments/embedded-benchmark.md)
    python benchmarks/wall.py --quick --steps 60 --forget-batch-size 32 \
        --out benchmarks/results/wall_forget_batch_32.json   # docs/experiments/embedded-benchmark.md, "A forget batch of its own"
    python benchmarks/wall.py --quick --steps 56 --forget-batch-size 32 --retrack-lambda 0.07 \
        --out benchmarks/results/wall_forget_batch_32_steps56.json

The issue's target is "ReTrack's wall time at most 5% of the retrained model's training time".
methods.py reports each model's training time from when it was trained; on a shared machine the
same work takes up to ~20% longer from one hour to the next, so this script times both in the same
run: every repeat retrains the gold-standard model from scratch (the pretraining preset, on the
retained data only) and then runs ReTrack once per training seed from the cached original.
`ratio` is the median over repeats of (median ReTrack seconds in the repeat / its retraining seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from retrack.config.train import MethodConfig, TrainConfig
from retrack.data.corpus import read_corpus
from retrack.embedded.demo import RECIPE_METHOD, RECIPE_TRAIN
from retrack.data.forget import read_forget_ids
from retrack.models.pixel import load_pixel_model
from retrack.embedded.pretrain import PRESETS, ensure_pretrained, pretrain
from retrack.training.loop import run_unlearning, split_for_unlearning
from retrack.embedded.workspace import Workspace

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="pretraining preset (the recipe is the quick one's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-seeds", default="0,1,2", help="comma-separated ReTrack training seeds per repeat")
    ap.add_argument("--steps", type=int, default=RECIPE_TRAIN["steps"])
    ap.add_argument("--lr", type=float, default=RECIPE_TRAIN["lr"])
    ap.add_argument("--batch-size", type=int, default=RECIPE_TRAIN["batch_size"])
    ap.add_argument("--forget-batch-size", type=int, default=RECIPE_TRAIN["forget_batch_size"], help="forget-branch batch")
    ap.add_argument("--retrack-lambda", type=float, default=RECIPE_METHOD["params"]["lambda"])
    ap.add_argument("--retrack-k", type=int, default=RECIPE_METHOD["params"]["k"], help="1,616 = the quick benchmark's whole retain set")
    ap.add_argument("--retrack-t-min", type=int, default=RECIPE_METHOD["params"]["t_min"])
    ap.add_argument("--out", type=Path, default=RESULTS / "wall.json")
    args = ap.parse_args(argv)
    preset = args.preset

    ws = Workspace.default()
    pre = ensure_pretrained(ws, preset, models=("original",))
    corpus = read_corpus(ws.benchmark.corpus)
    forget_ids = read_forget_ids(ws.benchmark.forget_ids)
    cfg = MethodConfig(name="retrack", params={"lambda": args.retrack_lambda, "k": args.retrack_k, "t_min": args.retrack_t_min})
    data = split_for_unlearning(corpus, forget_ids, cfg)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, forget_batch_size=args.forget_batch_size, lr=args.lr)
    train_seeds = [int(x) for x in args.train_seeds.split(",")]

    repeats = []
    for r in range(args.repeats):
        _, retrain_s = pretrain(data.retain.numpy(), PRESETS[preset])  # what ensure_pretrained trains the gold standard on
        unlearn_s = []
        for ts in train_seeds:
            _, secs = run_unlearning(load_pixel_model(pre.original), data, cfg, train.model_copy(update={"seed": ts}))
            unlearn_s.append(secs)
        repeats.append({"retrain_seconds": retrain_s, "retrack_seconds": unlearn_s, "ratio": statistics.median(unlearn_s) / retrain_s})
        print(f"repeat {r}: retrain {retrain_s:.1f} s, retrack {statistics.median(unlearn_s):.2f} s, ratio {repeats[-1]['ratio']:.4f}", file=sys.stderr, flush=True)

    result = {
        "settings": {"preset": preset, "retrain_steps": PRESETS[preset].steps, "retrain_batch": PRESETS[preset].batch_size,
                     "retained_items": len(data.retain), "method": cfg.params, "steps": args.steps, "batch_size": args.batch_size, "forget_batch_size": args.forget_batch_size,
                     "lr": args.lr, "training_seeds": train_seeds},
        "retrain_seconds": statistics.median(r["retrain_seconds"] for r in repeats),
        "retrack_seconds": statistics.median(s for r in repeats for s in r["retrack_seconds"]),
        "ratio": statistics.median(r["ratio"] for r in repeats),
        "target_ratio": 0.05,
        "repeats": repeats,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join(["python benchmarks/wall.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
