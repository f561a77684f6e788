"""Evaluation on Ray: sampling spread over tasks, then the metrics, the verdict and the report.

Each task draws a contiguous range of sampling batches from BOTH models with the same seeds, so
the samples equal those of a single process and integrity stays paired. Models travel through
the object store as their files (no shared filesystem needed between nodes).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrack.evaluation import EvalReference, membership, score
from retrack.metrics import nearest_forget_distance
from retrack.models import load_pixel_model
from retrack.report import write_report
from retrack.verdict import Verdict, decide


def _pack(model_dir: str | Path) -> dict[str, bytes]:
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _unpack(files: dict[str, bytes], dest: Path) -> Path:
    for rel, data in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    return dest


def _sample_range(model_files: dict, n: int, first_batch: int, seed: int, batch_size: int, threads: int) -> np.ndarray:
    import torch

    from retrack.sampling import generate

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_pixel_model(_unpack(model_files, Path(tmp)))
        return generate(model, n, seed=seed, batch_size=batch_size, first_batch=first_batch)


def sample_on_ray(model_dirs: list[str | Path], n: int, seed: int, batch_size: int = 250, num_tasks: int | None = None) -> list[np.ndarray]:
    """n samples of each model, batches spread over Ray tasks; same seeds for every model."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_batches = -(-n // batch_size)
    tasks = max(1, min(num_tasks or cpus, n_batches))
    per = -(-n_batches // tasks)
    remote = ray.remote(num_cpus=1)(_sample_range)
    out = []
    for model_dir in model_dirs:
        ref = ray.put(_pack(model_dir))
        futures = []
        for t in range(tasks):
            b0 = t * per
            count = min(n, (b0 + per) * batch_size) - b0 * batch_size
            if count > 0:
                futures.append(remote.remote(ref, count, b0, seed, batch_size, 1))
        out.append(np.concatenate(ray.get(futures)))
    return out


@dataclass
class Evaluation:
    metrics: dict[str, dict]
    verdict: Verdict
    membership: dict | None
    report_dir: Path


def evaluate_request(
    original_dir: str | Path,
    unlearned_dir: str | Path,
    ref: EvalReference,
    n_samples: int,
    seed: int,
    max_frequency_ratio: float,
    alpha: float,
    report_dir: str | Path,
    request_id: str,
    context: dict,
) -> Evaluation:
    before, after = sample_on_ray([original_dir, unlearned_dir], n_samples, seed)
    original, unlearned = load_pixel_model(original_dir), load_pixel_model(unlearned_dir)
    metrics = {
        "original": score(original, before, ref) | {"integrity": 0.0, "feature_integrity": 0.0},
        "unlearned": score(unlearned, after, ref, original_samples01=before),
    }
    member = None if ref.holdout_m11 is None else membership(unlearned, ref, alpha)
    verdict = decide(metrics["original"], metrics["unlearned"], member, max_frequency_ratio)
    shown = slice(0, 64)
    redact = (nearest_forget_distance(before[shown], ref.forget01) < ref.threshold) | (
        nearest_forget_distance(after[shown], ref.forget01) < ref.threshold
    )
    out = write_report(report_dir, request_id, metrics, verdict, member, before[shown], after[shown], redact, context)
    return Evaluation(metrics=metrics, verdict=verdict, membership=member, report_dir=out)
