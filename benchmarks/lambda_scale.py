"""Is there a scale-free lambda? The two terms' magnitudes at the start of unlearning, against the
lambda each setting needed on the embedded benchmark -> benchmarks/results/lambda_scale.json.

    python benchmarks/lambda_scale.py     # about 2 min on 2 cores

ReTrack's loss is lambda * L_kNN + (1 - lambda) * L_retain. The paper tunes lambda per dataset
(0.005 on MNIST, 0.5 on Stable Diffusion) and this benchmark needed 0.03 to 0.1 depending on K and
t_min (docs/experiments/embedded-benchmark.md). A lambda that carries over would weigh the terms
by their expected magnitudes: lambda' = lambda * m_kNN / (lambda * m_kNN + (1 - lambda) * m_retain),
the kNN term's share. For each setting this script measures, on the original model and over the
same draws as training (forget batch 32, retain batch 128, fixed seeds):
- the theta-dependent part of each term, E ||eps_theta - target||^2 and E ||eps_theta - eps||^2
  (the kNN term's spread does not depend on theta and moves no parameter);
- the norm of each term's gradient over every parameter, the magnitude that decides the update;
and the share lambda' each measure gives at the lambda that setting needed. A scale-free lambda
exists on this evidence if lambda' is about the same wherever the needed lambda differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from retrack.config.train import MethodConfig, TrainConfig
from retrack.data.corpus import read_corpus
from retrack.data.forget import read_forget_ids
from retrack.embedded.pretrain import ensure_pretrained
from retrack.embedded.workspace import Workspace
from retrack.methods import method_class
from retrack.methods.branches import noise
from retrack.methods.retrack import knn_target
from retrack.models.pixel import load_pixel_model
from retrack.models.schedule import NoiseSchedule, sum_sq
from retrack.training.loop import BatchDrawer, pixel_denoiser, split_for_unlearning

RESULTS = Path(__file__).parent / "results"

# (K, t_min, the lambda that setting needed, where it was measured): the smallest swept lambda
# that brought the forget frequency to at most 10% of the original's (the sweeps' steps make each
# figure good to about +-30%).
SETTINGS = [
    (10, 0, 0.03, "methods_lambda.json (lr 5e-5, 50 x 128): frequency 0.001 at 0.03, 0.011 at 0.02 (original 0.030)"),
    (30, 100, 0.1, "embedded-benchmark.md, panel B (lr 7e-5, 40 x 128): 0.0015 at 0.1, 0.0044 at 0.07 (original 0.0295)"),
    (1616, 100, 0.07, "methods_k_all_six_sets.json (lr 7e-5, 40 x 128): ratio to the original 0.054 at 0.07, 0.146 at 0.05"),
    (1616, 0, 0.03, "methods_k_all_t_min_0.json (lr 7e-5, 40 x 128, training seeds 10-13, set 1000): ratio to the original 0 at 0.03, 0.129 at 0.02"),
]


def magnitudes(model, data, schedule: NoiseSchedule, t_min: int, draws: int, seed: int) -> dict:
    """Means over `draws` batches of the two terms' theta-dependent parts and gradient norms."""
    train = TrainConfig(steps=draws, batch_size=128, forget_batch_size=32, seed=seed)
    drawer = BatchDrawer(data, method_class("retrack").requirements, train)
    denoise = pixel_denoiser(model.unet)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    out = {"knn": [], "retain": [], "knn_grad": [], "retain_grad": [], "spread": []}
    for step in range(draws):
        batch, gen = drawer.microbatch(step, 0)
        f = noise(schedule, batch.forget, gen, t_min=t_min)
        r = noise(schedule, batch.retain, gen)
        knn = knn_target(schedule, f.xt, f.t, batch.neighbours, batch.neighbour_of)
        for name, pred_of, target in (("knn", lambda: denoise(f.xt, f.t), knn.target), ("retain", lambda: denoise(r.xt, r.t), r.eps)):
            loss = sum_sq(pred_of() - target).mean()
            grads = torch.autograd.grad(loss, params)
            out[name].append(loss.item())
            out[f"{name}_grad"].append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        out["spread"].append(knn.spread.mean().item())
    return {k: statistics.fmean(v) for k, v in out.items()}


def share(lam: float, m_knn: float, m_retain: float) -> float:
    return lam * m_knn / (lam * m_knn + (1 - lam) * m_retain)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=24, help="batches averaged per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "lambda_scale.json")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    ws = Workspace.default()
    pre = ensure_pretrained(ws, "quick", models=("original",))
    corpus, forget_ids = read_corpus(ws.benchmark.corpus), read_forget_ids(ws.benchmark.forget_ids)
    model = load_pixel_model(pre.original)
    model.unet.eval()  # the statistics of the model being unlearned, before its first update
    schedule = NoiseSchedule.from_scheduler(model.scheduler, torch.device("cpu"))
    rows = []
    for k, t_min, needed, source in SETTINGS:
        data = split_for_unlearning(corpus, forget_ids, MethodConfig(name="retrack", params={"k": k, "t_min": t_min}))
        m = magnitudes(model, data, schedule, t_min, args.draws, args.seed)
        row = {"k": k, "t_min": t_min, "needed_lambda": needed, "source": source, **{f"mean_{n}": v for n, v in m.items()},
               "loss_ratio": m["knn"] / m["retain"], "grad_ratio": m["knn_grad"] / m["retain_grad"]}
        row["share_by_loss"] = share(needed, m["knn"], m["retain"])
        row["share_by_grad"] = share(needed, m["knn_grad"], m["retain_grad"])
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "source"}), flush=True)
    args.out.write_text(json.dumps({
        "benchmark": "embedded digits, 8x8x1, the quick preset's original model",
        "draws_per_setting": args.draws, "forget_batch": 32, "retain_batch": 128,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": rows,
    }, indent=1) + "\n")
    return args.out


if __name__ == "__main__":
    print(main())
