"""Safety of what is loaded (no pickle from storage, names cannot leave the storage root) and
credentials kept out of errors and logs. The refusals of pickle-only models, tampered indexes and
unsafe YAML are rows of tests/unit/test_bad_input_suite.py; this module covers the rest."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from retrack.audit import AuditLog
from retrack.errors import InputError, StorageError, redact
from retrack.training.step import load_optimizer_state, make_optimizer, save_optimizer_state
from retrack.storage.location import Location, S3Options

REPO = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

# Calls that would load pickle or run code from a file; retrack and its stages use none of them.
UNSAFE_LOADS = [
    r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bjoblib\.load\(", r"\byaml\.load\(", r"\byaml\.unsafe_load\(",
    r"\btorch\.load\(", r"allow_pickle\s*=\s*True", r"use_safetensors\s*=\s*False", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
]


def test_no_unsafe_loader_in_the_code():
    hits = []
    for path in sorted([*(REPO / "retrack").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in UNSAFE_LOADS):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []


def test_optimizer_checkpoint_is_safetensors_and_a_pickle_is_not_loaded(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = make_optimizer(model.parameters(), 1e-3)
    opt.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    path = tmp_path / "optimizer.safetensors"
    save_optimizer_state(opt, str(path))
    restored = make_optimizer(torch.nn.Linear(4, 3).parameters(), 5e-5)
    load_optimizer_state(restored, str(path))
    a, b = opt.state_dict(), restored.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    # A pickled state dict put in its place (what torch.save writes) is not unpickled.
    path.write_bytes(pickle.dumps(a))
    with pytest.raises(Exception) as err:
        load_optimizer_state(restored, str(path))
    assert "header" in str(err.value).lower() or "safetensor" in type(err.value).__module__


@pytest.mark.parametrize("part", ["../other", "a/../../b", ".."])
def test_storage_paths_cannot_climb_out_of_their_root(tmp_path, part):
    for root in (Location.parse(tmp_path / "root"), Location.parse("s3://bucket/root")):
        with pytest.raises(InputError, match="contains '..'"):
            root / part


@pytest.mark.parametrize("request_id", ["../../etc", "a/b", "/abs", ".hidden", "x" * 200])
def test_request_ids_cannot_name_a_path_outside_the_audit_folder(tmp_path, request_id):
    with pytest.raises(InputError, match="must be 1-128 characters"):
        AuditLog(tmp_path).attempts(request_id)
    assert not any(tmp_path.rglob("*"))


def test_redact_masks_uri_credentials_and_secret_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = redact(f"http://user:pw@host:5000/x failed; key={SECRET}; s3://bucket/key")
    assert text == "http://***@host:5000/x failed; key=***; s3://bucket/key"


def test_unreachable_endpoint_error_names_it_but_not_the_secret(monkeypatch, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    loc = Location.parse("s3://bucket/jobs", s3=S3Options(endpoint="http://127.0.0.1:9", access_key="AKIDEXAMPLE", secret_key=SECRET, retries=1))
    with pytest.raises(StorageError) as err:
        loc.read_bytes()
    assert "127.0.0.1:9" in str(err.value) and SECRET not in str(err.value) and SECRET not in repr(loc)
    out, errs = capfd.readouterr()
    assert SECRET not in out + errs


@pytest.mark.parametrize("channels", [1, 3])
def test_the_privacy_scan_finds_a_forget_image_drawn_at_any_upscale_in_a_png_and_nothing_else(channels):
    """A forget image pasted into a sample grid at scale 1 to 8 is found; the grid without it, or
    with one pixel of the copy changed, is not (the check is exact)."""
    import io

    import numpy as np
    from PIL import Image

    from retrack.privacy import ForgetContent, scan_blob

    rng = np.random.default_rng(channels)
    needle = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8)
    content = ForgetContent(images_u8=[needle])

    def png(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if channels == 1 else img).save(buf, format="PNG")
        return buf.getvalue()

    for scale in (1, 3, 8):
        grid = np.zeros((150, 170, channels), np.uint8)  # a black background, as sample grids have
        copy = needle.repeat(scale, 0).repeat(scale, 1)
        grid[17 : 17 + len(copy), 41 : 41 + len(copy)] = copy
        assert [f.what for f in scan_blob(png(grid), "grid.png", content)] == ["forget image #0 drawn in a PNG"]
        grid[17 + len(copy) - 1, 41] ^= 1
        assert scan_blob(png(grid), "grid.png", content) == []
    assert scan_blob(png(np.zeros((150, 170, channels), np.uint8)), "grid.png", content) == []
