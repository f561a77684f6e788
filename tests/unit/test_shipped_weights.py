"""The pretrained weights shipped for the embedded default: intact, installed only for the
benchmark and config they were made for, and refused when their files differ from the manifest."""

from __future__ import annotations

import json
import shutil

import pytest

from retrack.digest import directory_digest
from retrack.embedded import shipped
from retrack.embedded.pretrain import ensure_pretrained, model_keys
from retrack.embedded.workspace import Workspace
from retrack.errors import ModelLayoutError
from retrack.evaluation.metrics import load_classifier
from retrack.models.pixel import DIGEST_FILE, load_pixel_model


def test_every_shipped_entry_matches_its_digest_and_the_demo_presets_are_there():
    manifest = json.loads(shipped.MANIFEST.read_text())
    assert {"quick/original", "quick/classifier"} <= set(manifest)
    for name, entry in manifest.items():
        assert directory_digest(shipped.SHIPPED / name) == entry["sha256"], name


def test_the_embedded_benchmark_gets_the_shipped_weights_without_training(tmp_path):
    ws = Workspace(tmp_path)
    pre = ensure_pretrained(ws, "quick", models=("original",))
    keys = model_keys(ws, "quick")
    manifest = json.loads(shipped.MANIFEST.read_text())
    assert manifest["quick/original"]["key"] == keys["quick/original"]  # made for this very benchmark and preset
    # Installed, not trained: the marker (with the shipped training time) is the shipped one.
    assert (pre.original / DIGEST_FILE).read_text() == (shipped.SHIPPED / "quick" / "original" / DIGEST_FILE).read_text()
    assert pre.original_seconds == json.loads((pre.original / DIGEST_FILE).read_text())["train_seconds"]
    assert pre.retrained_seconds is None and not pre.retrained.exists()
    assert load_pixel_model(pre.original).unet.config.sample_size == 8
    assert load_classifier(pre.classifier).config.num_classes == 10


def test_weights_made_for_another_key_are_not_installed(tmp_path):
    assert not shipped.install_shipped("quick", "original", "0" * 64, tmp_path / "out")
    assert not shipped.install_shipped("no-such-preset", "original", "0" * 64, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shipped_files_that_differ_from_the_manifest_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "pretrained"
    shutil.copytree(shipped.SHIPPED, copy)
    weights = copy / "quick" / "original" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "SHIPPED", copy)
    monkeypatch.setattr(shipped, "MANIFEST", copy / "manifest.json")
    with pytest.raises(ModelLayoutError, match="do not match their digest"):
        ensure_pretrained(Workspace(tmp_path / "ws"), "quick", models=("original",))
    assert not (tmp_path / "ws" / "models" / "digits" / "quick" / "original").exists()
