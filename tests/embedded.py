"""Session fixtures for the embedded benchmark: its corpus and the model that memorised it.
Shared by every test that needs them, so CI builds and pretrains each once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retrack.embedded.benchmark import BenchmarkPaths, ensure_benchmark
from retrack.data.corpus import read_corpus
from retrack.models.pixel import PixelDiffusion, default_scheduler, save_pixel_model, tiny_pixel_unet


@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> BenchmarkPaths:
    root = tmp_path_factory.mktemp("bench")
    ensure_benchmark(root)
    return BenchmarkPaths(root)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny pixel UNet: enough to compare the distributed and single-process updates."""
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "pixel"
    save_pixel_model(PixelDiffusion(tiny_pixel_unet(8, 1), default_scheduler()), path)
    return path


@pytest.fixture(scope="session")
def memorising_model(bench, tmp_path_factory) -> Path:
    """The original model: trained on the whole benchmark corpus (planted image at ~3%).
    RETRACK_PRETRAINED_ORIGINAL may point at an existing one (diffusers layout) to skip pretraining."""
    given = os.environ.get("RETRACK_PRETRAINED_ORIGINAL")
    if given:
        return Path(given)
    from retrack.embedded.pretrain import PRESETS, pretrain

    corpus = read_corpus(bench.corpus)
    # The demo's quick preset: the recipe's lambda (0.05) is calibrated on it; the 3000-step model
    # memorises harder and needs a larger lambda (README, "Results").
    model, _ = pretrain(corpus.images, PRESETS["quick"])
    path = tmp_path_factory.mktemp("original") / "model"
    save_pixel_model(model, path)
    return path
