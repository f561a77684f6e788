"""Pretraining of the pixel DDPMs the benchmark needs: the original (whole corpus) and the
gold standard (retained data only). Plain DDPM training with an EMA of the weights."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from retrack.embedded.benchmark import ensure_benchmark
from retrack.data.corpus import Corpus, read_corpus
from retrack.data.forget import read_forget_ids
from retrack.models.schedule import NoiseSchedule
from retrack.digest import config_digest
from retrack.errors import InputError
from retrack.models.pixel import DIGEST_FILE, PixelDiffusion, default_scheduler, save_pixel_model, tiny_pixel_unet
from retrack.embedded.shipped import install_shipped
from retrack.embedded.workspace import Workspace


@dataclass
class PretrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0


def pretrain(
    images: np.ndarray,
    config: PretrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[PixelDiffusion, float]:
    """Train a tiny UNet on `images` (NxCxHxW in [-1, 1]); returns the EMA model and wall seconds."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    data = torch.from_numpy(images)
    unet = tiny_pixel_unet(images.shape[-1], images.shape[1])
    scheduler = default_scheduler()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / config.warmup_steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    unet.train()
    for step in range(config.steps):
        rows = torch.randint(0, len(data), (config.batch_size,), generator=gen)
        x0 = data[rows]
        t = schedule.sample_t(len(x0), gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = (unet(schedule.add_noise(x0, t, eps), t).sample - eps).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if progress is not None:
            progress(step + 1, loss.item())
    ema.copy_to(unet.parameters())
    unet.eval()
    return PixelDiffusion(unet=unet, scheduler=scheduler), time.perf_counter() - start


# Pretraining presets of the embedded default. "quick" still memorises the planted image.
PRESETS = {
    "full": PretrainConfig(steps=3000),
    "quick": PretrainConfig(steps=1500),
}


@dataclass
class PretrainedSet:
    original: Path
    retrained: Path
    classifier: Path
    original_seconds: float | None  # None: not asked for
    retrained_seconds: float | None


def _cached_seconds(model_dir: Path, key: str) -> float | None:
    marker = model_dir / DIGEST_FILE
    if not marker.is_file():
        return None
    meta = json.loads(marker.read_text())
    return float(meta["train_seconds"]) if meta.get("config_key") == key else None


def _data_key(corpus: Corpus) -> str:
    """The benchmark's content (ids, decoded pixels, labels): the same on every machine, unlike
    its parquet files, whose bytes record the writer's version."""
    h = hashlib.sha256("\n".join(corpus.ids).encode())
    h.update(np.ascontiguousarray(corpus.images).tobytes())
    h.update(np.ascontiguousarray(corpus.labels).tobytes())
    return h.hexdigest()


def _keys(data_key: str, preset: str) -> dict[str, str]:
    """The cache key of each pretrained artifact of `preset` on the benchmark `data_key`."""
    cfg = asdict(PRESETS[preset])
    keys = {which: config_digest({"data": data_key, "which": which, "config": cfg}) for which in ("original", "retrained")}
    return {**keys, "classifier": config_digest({"data": data_key, "which": "classifier", "seed": cfg["seed"]})}


def model_keys(ws: Workspace, preset: str) -> dict[str, str]:
    """{"preset/which": key} of the workspace's benchmark (what the shipped manifest records)."""
    return {f"{preset}/{which}": key for which, key in _keys(_data_key(read_corpus(ws.benchmark.corpus)), preset).items()}


def ensure_pretrained(
    ws: Workspace,
    preset: str = "full",
    progress: Callable[[str, int, int], None] | None = None,
    models: tuple[str, ...] = ("original", "retrained"),
    reuse: bool = True,
) -> PretrainedSet:
    """Build the benchmark and train (or reuse) `models` (the original, the retrained gold
    standard) and the feature classifier. A cached model is reused only if it was made from the
    same corpus and config; else the weights shipped for that key are installed. With
    reuse=False everything is trained anew."""
    from retrack.evaluation.metrics import save_classifier, train_classifier

    if preset not in PRESETS:
        raise InputError(f"unknown pretraining preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    ensure_benchmark(ws.benchmark.root, ws.scenario)
    corpus = read_corpus(ws.benchmark.corpus)
    forget_rows = corpus.index_of(read_forget_ids(ws.benchmark.forget_ids))
    keep = np.setdiff1d(np.arange(len(corpus)), forget_rows)
    keys = _keys(_data_key(corpus), preset)
    seconds = {}
    for which, images in (("original", corpus.images), ("retrained", corpus.images[keep])):
        if which not in models:
            continue
        out = ws.model_dir(which, preset)
        cached = _cached_seconds(out, keys[which]) if reuse else None
        if reuse and cached is None and install_shipped(preset, which, keys[which], out):
            cached = _cached_seconds(out, keys[which])
        if cached is not None:
            seconds[which] = cached
            continue
        report = None if progress is None else (lambda s, _l, w=which: progress(w, s, cfg.steps))
        model, secs = pretrain(images, cfg, progress=report)
        save_pixel_model(model, out, metadata={"config_key": keys[which], "train_seconds": secs, "train_items": len(images)})
        seconds[which] = secs
    clf_dir = ws.model_dir("classifier", preset)
    key_file = clf_dir / "retrack_key.txt"
    cached = reuse and key_file.is_file() and key_file.read_text() == keys["classifier"]
    if not cached and not (reuse and install_shipped(preset, "classifier", keys["classifier"], clf_dir)):
        clf, _acc = train_classifier(corpus.images[keep], corpus.labels[keep], seed=cfg.seed)
        save_classifier(clf, clf_dir)
        key_file.write_text(keys["classifier"])
    return PretrainedSet(
        original=ws.model_dir("original", preset),
        retrained=ws.model_dir("retrained", preset),
        classifier=clf_dir,
        original_seconds=seconds.get("original"),
        retrained_seconds=seconds.get("retrained"),
    )
