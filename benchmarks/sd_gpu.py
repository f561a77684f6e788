"""SD-1.5's UNet update on a GPU: retrack's training step beside a bare PyTorch/diffusers loop.

    python benchmarks/sd_gpu.py            # -> benchmarks/results/sd_gpu.json (needs a CUDA GPU)

Both sides train the same SD-1.5-shaped UNet (860M parameters, random weights, nothing
downloaded) in bf16 autocast with fused AdamW on the same kind of batch: a forget batch and a retain
batch of captioned latents, denoised together in one forward pass. retrack's side is what a
training worker runs per update (`BatchDrawer` serving the micro-batch on the device, the ReTrack
method's losses with its kNN target, `unlearning_step`: per-loss gradients, clipping, the
optimiser); the bare side is the plain loop a user would write for the same loss (the kNN target
formed directly over the K neighbours, one `backward`, clip, step). Latents and text conditioning
are random: encoding happens once before training, not per update, on either side.

Each configuration runs `--rounds` rounds, alternating which side goes first; a round restores the
initial weights, warms up, then times `--updates` updates between device synchronisations. Recorded
per side: images/s (median over rounds), seconds per update, peak GPU memory; and the ratio of
bare to retrack images/s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sd_shape import sd15_unet_config  # noqa: E402

TEXT_TOKENS, TEXT_DIM = 77, 768
POOL, FORGET_ITEMS = 512, 4  # retained latents drawn from; items to forget


def make_data(resolution: int, k: int, seed: int = 0):
    """Random latents and text conditioning on the CPU, where a worker keeps its data."""
    from retrack.training.loop import UnlearnData

    g = torch.Generator().manual_seed(seed)
    shape = (4, resolution // 8, resolution // 8)
    retain = torch.randn(POOL, *shape, generator=g)
    forget = torch.randn(FORGET_ITEMS, *shape, generator=g)
    neighbours = retain[torch.randint(0, POOL, (FORGET_ITEMS, k), generator=g)]
    return UnlearnData(retain=retain, forget=forget, neighbours=neighbours,
                       retain_cond=torch.randn(POOL, TEXT_TOKENS, TEXT_DIM, generator=g),
                       forget_cond=torch.randn(FORGET_ITEMS, TEXT_TOKENS, TEXT_DIM, generator=g))


def retrack_updates(unet, data, cfg: dict, device: torch.device):
    """retrack's per-update path, as `pipelines/unlearn/worker.py` runs it on one GPU."""
    from retrack.config.train import TrainConfig
    from retrack.methods import build_method
    from retrack.models.schedule import NoiseSchedule
    from retrack.models.sd import ConditionalDenoiser, sd_scheduler
    from retrack.training.loop import BatchDrawer
    from retrack.training.precision import autocast
    from retrack.training.step import make_optimizer, unlearning_step

    train = TrainConfig(steps=10**6, batch_size=cfg["batch"], forget_batch_size=cfg["forget_batch"], lr=1e-5, mixed_precision="bf16")
    method = build_method("retrack", NoiseSchedule.from_scheduler(sd_scheduler(), device), {"k": cfg["k"], "lambda": cfg["lambda"]})
    drawer = BatchDrawer(data, method.requirements, train, device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, train.lr, train.betas, train.weight_decay)
    denoise = ConditionalDenoiser(unet)
    step = 0
    while True:
        batch, gen = drawer.microbatch(step, 0)
        logs = unlearning_step(method, params, opt, denoise, [batch], [gen], step=step, autocast=lambda: autocast("cuda", "bf16"))
        step += 1
        yield logs["loss"]


def bare_updates(unet, data, cfg: dict, device: torch.device):
    """The same loss and passes written plainly with PyTorch and diffusers."""
    from diffusers import DDPMScheduler

    lam, b, f = cfg["lambda"], cfg["batch"], cfg["forget_batch"]
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    abar = sched.alphas_cumprod.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.95, 0.999), weight_decay=1e-6, fused=True)
    g = torch.Generator().manual_seed(0)
    while True:
        fi, ri = torch.randint(0, len(data.forget), (f,), generator=g), torch.randint(0, len(data.retain), (b,), generator=g)
        x0 = torch.cat([data.forget[fi], data.retain[ri]]).to(device)
        cond = torch.cat([data.forget_cond[fi], data.retain_cond[ri]]).to(device)
        nb = data.neighbours[fi].to(device)  # (f, K, 4, h, w)
        t = torch.randint(0, sched.config.num_train_timesteps, (f + b,), device=device)
        eps = torch.randn_like(x0)
        xt = sched.add_noise(x0, eps, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(xt, t, encoder_hidden_states=cond).sample.float()
        with torch.no_grad():
            a = abar[t[:f]].view(-1, 1, 1, 1, 1)
            v = (xt[:f, None] - a.sqrt() * nb) / (1 - a).sqrt()  # the K targets of each forget sample
            p = torch.softmax(-0.5 * v.flatten(2).square().sum(-1), dim=1)
            target = (p[..., None, None, None] * v).sum(1)
        loss_knn = (pred[:f] - target).square().flatten(1).sum(1).mean()
        loss_retain = (pred[f:] - eps[f:]).square().flatten(1).sum(1).mean()
        loss = lam * loss_knn + (1 - lam) * loss_retain
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield loss.item()


def timed_round(side, unet, init: dict, data, cfg: dict, device: torch.device, warmup: int, updates: int) -> dict:
    unet.load_state_dict(init)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run = side(unet, data, cfg, device)
    for _ in range(warmup):
        next(run)
    torch.cuda.synchronize()
    began = time.perf_counter()
    losses = [next(run) for _ in range(updates)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    run.close()
    peak = torch.cuda.max_memory_allocated()
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"{side.__name__}: a loss is not finite: {losses}")
    images = (cfg["batch"] + cfg["forget_batch"]) * updates
    return {"images_per_second": images / seconds, "seconds_per_update": seconds / updates, "peak_gpu_gb": peak / 1e9}


def bench(unet, init: dict, cfg: dict, device: torch.device, rounds: int, warmup: int, updates: int) -> dict:
    data = make_data(cfg["resolution"], cfg["k"])
    sides = {"retrack": retrack_updates, "bare": bare_updates}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runs[name].append(timed_round(sides[name], unet, init, data, cfg, device, warmup, updates))
            print(f"{cfg['resolution']}px round {r} {name}: {runs[name][-1]['images_per_second']:.1f} images/s", flush=True)
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "images_per_second": round(statistics.median(x["images_per_second"] for x in rs), 2),
            "images_per_second_rounds": [round(x["images_per_second"], 2) for x in rs],
            "seconds_per_update": round(statistics.median(x["seconds_per_update"] for x in rs), 4),
            "peak_gpu_gb": round(max(x["peak_gpu_gb"] for x in rs), 2),
        }
    # Per round, side by side: how much faster bare ran than retrack in that round.
    ratios = [b["images_per_second"] / t["images_per_second"] for b, t in zip(runs["bare"], runs["retrack"])]
    return {"settings": cfg, **out, "bare_over_retrack": round(statistics.median(ratios), 3),
            "bare_over_retrack_rounds": [round(x, 3) for x in ratios]}


def parse_config(text: str, k: int, lam: float) -> dict:
    res, batch, forget = (int(x) for x in text.split(":"))
    return {"resolution": res, "batch": batch, "forget_batch": forget, "k": k, "lambda": lam}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="256:32:8,512:16:4", help="resolution:retain batch:forget batch, comma-separated")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sd_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sd_gpu.py measures a GPU; this machine has none (torch.cuda.is_available() is False)")
    import diffusers
    from diffusers import UNet2DConditionModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**sd15_unet_config(256))
    init = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.train()
    configs = [parse_config(c, args.k, args.lam) for c in args.configs.split(",")]
    results = [bench(unet, init, cfg, device, args.rounds, args.warmup, args.updates) for cfg in configs]
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(), "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                    "python": platform.python_version()},
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "protocol": {"rounds": args.rounds, "warmup_updates": args.warmup, "timed_updates": args.updates, "precision": "bf16 autocast, fp32 weights",
                     "optimizer": "AdamW fused", "gradient_checkpointing": False},
        "configs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
