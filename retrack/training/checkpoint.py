"""The unlearn stage's checkpoint format: UNet weights (safetensors), AdamW state (safetensors,
never a pickle: see `retrack.training.step.save_optimizer_state`) and a state file with the
step, the loss history, the config hash and the digest of each file, so a partially uploaded
checkpoint never verifies."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from retrack.training.step import load_optimizer_state, save_optimizer_state

STATE_FILE = "retrack_state.json"
UNET_FILE = "unet.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(name: str) -> int | None:
    """The step a checkpoint folder's name stands for; None for any other name."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(unet: torch.nn.Module, opt: torch.optim.Optimizer, step: int, history: list[dict], chash: str, world: int,
                    extra: dict | None = None) -> str:
    """Write a checkpoint into a new temporary directory and return it (the caller uploads and
    removes it); `extra` (JSON-able, e.g. the fp16 loss scaler's state) goes into its state file."""
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp(prefix="retrack-ckpt-")
    save_file({k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}, os.path.join(tmp, UNET_FILE))
    save_optimizer_state(opt, os.path.join(tmp, OPTIMIZER_FILE))
    files = {name: file_sha256(os.path.join(tmp, name)) for name in (UNET_FILE, OPTIMIZER_FILE)}
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({"step": step, "config_hash": chash, "history": history, "world_size": world, "files": files, **(extra or {})}, f)
    return tmp


def verified_state(directory: str | Path) -> dict | None:
    """The state of a complete checkpoint (every file present with its recorded digest), else None."""
    try:
        state = json.loads(Path(directory, STATE_FILE).read_text())
        ok = all(file_sha256(os.path.join(directory, n)) == sha for n, sha in state["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if ok else None


def load_checkpoint(directory: str | Path, unet: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(os.path.join(directory, UNET_FILE), device=str(device)))
    load_optimizer_state(opt, os.path.join(directory, OPTIMIZER_FILE), device)


def load_unet_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, UNET_FILE))
