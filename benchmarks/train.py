"""Cost of the unlearn stage, measured side by side in one run; writes benchmarks/results/train.json.

  .venv/bin/python benchmarks/train.py [--repeats 3] [--steps 30] [--batch 64]

Figures (medians over the repeats, every repeat interleaving the contenders so that a noisy,
shared machine slows them alike):
Ray workers run at niceness 0 here (Ray's default is 15; see below).

- ray_vs_bare_ratio: per-update time of ReTrack inside a 1-worker Ray Train run (the real stage:
  BatchDrawer, per-loss gradients, progress queue) / a bare PyTorch loop doing the same passes
  (same micro-batches, one forward of forget+retain, `loss.backward()`, clip, AdamW). Target <= 1.10.
- retrack_vs_two_vanilla_ratio: a ReTrack update / two Vanilla updates at the same batch (ReTrack's
  forget and retain branches are two Vanilla-sized passes; the kNN targets and the plumbing are the
  overhead). Target <= 1.05. Also given against one Vanilla update at double batch.
- siss_vs_retrack_ratio, erasediff_vs_retrack_ratio: their update / a ReTrack update (all through
  `retrack.step.unlearning_step`, one process).
- world_size_max_abs_loss_diff: the largest |loss(1 worker) - loss(2 workers)| over a run with the
  same global batch, micro-batches, seed and data (and the same against the single process).
Per-update times exclude the first 3 updates (warm-up). CPU runs use one torch thread per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrack.embedded.benchmark import BenchmarkPaths, ensure_benchmark  # noqa: E402
from retrack.config.train import MethodConfig, TrainConfig  # noqa: E402
from retrack.data.corpus import read_corpus  # noqa: E402
from retrack.data.forget import read_forget_ids  # noqa: E402
from retrack.models.schedule import NoiseSchedule  # noqa: E402
from retrack.methods import build_method  # noqa: E402
from retrack.models.pixel import PixelDiffusion, default_scheduler, load_pixel_model, save_pixel_model, tiny_pixel_unet  # noqa: E402
from retrack.training.step import MAX_GRAD_NORM, make_optimizer  # noqa: E402
from retrack.training.loop import BatchDrawer, pixel_denoiser, run_unlearning, split_for_unlearning  # noqa: E402

WARMUP = 3
METHODS = {"retrack": {"k": 10, "lambda": 0.005}, "vanilla": {}, "siss": {}, "erasediff": {}}


def median_step(times: list[float]) -> float:
    return statistics.median(times[WARMUP:])


def library_steps(model_dir: Path, data, name: str, train: TrainConfig) -> list[float]:
    """Per-update seconds of the library's own loop (`run_unlearning`) in this process."""
    model = load_pixel_model(model_dir)
    stamps = [time.perf_counter()]
    run_unlearning(model, data, MethodConfig(name=name, params=METHODS[name]), train, progress=lambda _s, _l: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bare_steps(model_dir: Path, data, train: TrainConfig) -> list[float]:
    """The same ReTrack passes written as a plain PyTorch loop: loss.backward(), clip, step."""
    model = load_pixel_model(model_dir)
    method = build_method("retrack", NoiseSchedule.from_scheduler(model.scheduler), METHODS["retrack"])
    drawer = BatchDrawer(data, method.requirements, train)
    opt = make_optimizer(model.unet.parameters(), train.lr, train.betas, train.weight_decay)
    denoise = pixel_denoiser(model.unet)
    model.unet.train()
    out = []
    for step in range(train.steps):
        t0 = time.perf_counter()
        for m in range(train.grad_accum):
            batch, gen = drawer.microbatch(step, m)
            loss = method.losses(denoise, batch, gen).losses["loss"] / train.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out


def ray_run(bench: BenchmarkPaths, model_dir: Path, tmp: Path, name: str, train: TrainConfig, workers: int, tag: str):
    from pipelines.unlearn.driver import unlearn
    from retrack.config.spec import CorpusSpec, ForgetSpec, ModelSpec, ScalingSpec, StorageSpec, UnlearnSpec
    from retrack.config.unlearn_run import UnlearnRun

    spec = UnlearnSpec(
        request_id=f"bench-{tag}",
        model=ModelSpec(uri=str(model_dir)),
        corpus=CorpusSpec(uri=str(bench.corpus)),
        forget=ForgetSpec(file=str(bench.forget_ids)),
        method=MethodConfig(name=name, params=METHODS[name]),
        train=train,
        scaling=ScalingSpec(num_workers=workers, cpus_per_worker=1.0 if workers == 1 else 0.5),
        storage=StorageSpec(root=str(tmp / "runs")),
    )
    req = UnlearnRun(spec=spec, output_dir=str(tmp / f"out-{tag}"), checkpoint_root=str(tmp / "runs"), run_name=f"bench-{tag}-{time.time_ns()}")
    return unlearn(req)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args()

    from pipelines.runtime import ensure_ray

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="retrack-train-bench-"))
    bench = BenchmarkPaths(tmp / "bench")
    ensure_benchmark(bench.root)
    torch.manual_seed(0)
    model_dir = tmp / "model"
    save_pixel_model(PixelDiffusion(tiny_pixel_unet(8, 1), default_scheduler()), model_dir)
    corpus, forget = read_corpus(bench.corpus), read_forget_ids(bench.forget_ids)
    data = split_for_unlearning(corpus, forget, MethodConfig(name="retrack", params=METHODS["retrack"]))
    train = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=1, lr=5e-5, checkpoint_every=0)

    # ensure_ray runs a local instance's workers at niceness 0, like the bare loop here (Ray's
    # default of 15 made the Ray steps ~15% slower on a shared machine).
    ray = ensure_ray(num_cpus=os.cpu_count() or 2)
    times: dict[str, list[float]] = {k: [] for k in ("bare", "ray", "retrack", "vanilla", "vanilla_2x", "siss", "erasediff")}
    double = train.model_copy(update={"batch_size": 2 * args.batch})
    for r in range(args.repeats):
        times["bare"].append(median_step(bare_steps(model_dir, data, train)))
        res = ray_run(bench, model_dir, tmp, "retrack", train, 1, f"overhead-{r}")
        times["ray"].append(median_step([h["seconds"] for h in res.history]))
        for name in ("retrack", "vanilla", "siss", "erasediff"):
            times[name].append(median_step(library_steps(model_dir, data, name, train)))
        times["vanilla_2x"].append(median_step(library_steps(model_dir, data, "vanilla", double)))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k}={v[-1] * 1000:.1f}ms" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    # World-size invariance: same global batch (2 micro-batches), seed and data on 1 and 2 workers.
    inv_train = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=2, lr=5e-5, checkpoint_every=0)
    curves = {w: [h["loss"] for h in ray_run(bench, model_dir, tmp, "retrack", inv_train, w, f"ws{w}").history] for w in (1, 2)}
    from retrack.training.loop import run_unlearning

    ref_model = load_pixel_model(model_dir)
    ref_hist, _ = run_unlearning(ref_model, data, MethodConfig(name="retrack", params=METHODS["retrack"]), inv_train)
    ref = np.array([h["loss"] for h in ref_hist])
    one, two = np.array(curves[1]), np.array(curves[2])
    ray.shutdown()

    result = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu", "shared_with_other_jobs": True},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "setup": {
            "benchmark": "digits (8x8x1, embedded)",
            "model": "tiny_pixel_unet(8, 1), untrained",
            "batch_size": args.batch,
            "steps_per_run": args.steps,
            "warmup_steps_excluded": WARMUP,
            "repeats": args.repeats,
            "torch_threads_per_process": 1,
            "methods": METHODS,
        },
        "step_seconds_median": {k: round(v, 6) for k, v in med.items()},
        "ray_vs_bare_ratio": round(med["ray"] / med["bare"], 4),
        "ray_vs_library_ratio": round(med["ray"] / med["retrack"], 4),
        "library_vs_bare_ratio": round(med["retrack"] / med["bare"], 4),
        "retrack_vs_two_vanilla_ratio": round(med["retrack"] / (2 * med["vanilla"]), 4),
        "retrack_vs_vanilla_double_batch_ratio": round(med["retrack"] / med["vanilla_2x"], 4),
        "siss_vs_retrack_ratio": round(med["siss"] / med["retrack"], 4),
        "erasediff_vs_retrack_ratio": round(med["erasediff"] / med["retrack"], 4),
        "world_size_max_abs_loss_diff": float(np.abs(one - two).max()),
        "world_size_max_rel_loss_diff": float((np.abs(one - two) / np.abs(one)).max()),
        "two_workers_vs_single_process_max_abs_loss_diff": float(np.abs(two - ref).max()),
        "world_size_loss_range": [float(min(one.min(), two.min())), float(max(one.max(), two.max()))],
        "targets": {"ray_vs_bare_ratio": 1.10, "retrack_vs_two_vanilla_ratio": 1.05},
        "notes": [
            "ray_vs_library_ratio isolates Ray's own cost (same step.py update in a plain process); "
            "library_vs_bare_ratio is step.py's per-loss gradient plumbing (autograd.grad per named loss, flat copies) "
            "against loss.backward(); their product is about ray_vs_bare_ratio (medians of noisy timings).",
            "The tiny 8x8 UNet makes fixed per-step costs (Python, copies, the progress push) large relative to compute; "
            "they shrink as the model grows.",
            "Measured on a 2-core machine shared with other developers' jobs: medians over interleaved repeats.",
        ],
        "ray_worker_niceness": os.environ.get("RAY_worker_niceness"),
        "gpu": None,
        "gpu_note": "no accelerator was lent to this task (device tool: can_start_another=false); the bf16 SD-UNet throughput section is not measured",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
