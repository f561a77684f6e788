"""Diffusion models in diffusers layout: tiny configs for the embedded default, checked load and save.

Weights are only ever read from safetensors; a directory of another kind is refused with a
message saying what was found instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from retrack.storage.atomic import atomic_directory
from retrack.digest import directory_digest
from retrack.errors import ModelLayoutError

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DIGEST_FILE = "retrack_digest.json"


def tiny_pixel_unet(image_size: int, channels: int = 1) -> UNet2DModel:
    """A ~1.1M-parameter UNet: three resolutions with attention only at the coarsest (cheap on CPU)."""
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=32,
    )


def default_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", clip_sample=True)


@dataclass
class PixelDiffusion:
    unet: UNet2DModel
    scheduler: DDPMScheduler

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)

    def sampling_scheduler(self) -> DDIMScheduler:
        """Deterministic DDIM over the same noise schedule: same seed, same image (integrity needs it)."""
        return DDIMScheduler.from_config(self.scheduler.config)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLayoutError(f"{path.parent}: missing {path.name}; expected a diffusers {what} directory") from None
    except json.JSONDecodeError as exc:
        raise ModelLayoutError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_pixel_model_dir(path: str | Path) -> None:
    """Refuse anything that is not a diffusers DDPM pipeline with a UNet2DModel in safetensors."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLayoutError(f"model directory {root} does not exist")
    unet_cfg = read_json(root / "unet" / "config.json", "UNet")
    cls = unet_cfg.get("_class_name")
    if cls != "UNet2DModel":
        raise ModelLayoutError(f"{root}/unet is a {cls or 'model without _class_name'}, expected a diffusers UNet2DModel")
    weights = root / "unet" / WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in (root / "unet").iterdir() if p.name != "config.json")
        raise ModelLayoutError(f"{root}/unet has no {WEIGHTS_FILE} (found: {others or 'nothing'}); only safetensors weights are loaded")
    sched = read_json(root / "scheduler" / "scheduler_config.json", "scheduler")
    if sched.get("_class_name") not in ("DDPMScheduler", "DDIMScheduler"):
        raise ModelLayoutError(f"{root}/scheduler is {sched.get('_class_name')!r}, expected DDPMScheduler or DDIMScheduler")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ModelLayoutError(f"{root}/scheduler predicts {sched.get('prediction_type')!r}; retrack's losses need 'epsilon'")


def scheduler_timesteps(path: str | Path) -> int:
    """T of a diffusers pipeline directory's scheduler (diffusers' default 1000 when unset)."""
    return int(read_json(Path(path) / "scheduler" / "scheduler_config.json", "scheduler").get("num_train_timesteps", 1000))


def load_pixel_model(path: str | Path, device: str | torch.device = "cpu") -> PixelDiffusion:
    check_pixel_model_dir(path)
    unet = UNet2DModel.from_pretrained(str(path), subfolder="unet", use_safetensors=True).to(device)
    scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
    return PixelDiffusion(unet=unet, scheduler=scheduler)


def save_pixel_model(model: PixelDiffusion, path: str | Path, metadata: dict | None = None) -> str:
    """Write the pipeline atomically (temp dir, then rename) and return its content digest."""
    return write_model_dir(path, lambda tmp: DDPMPipeline(unet=model.unet, scheduler=model.scheduler).save_pretrained(tmp, safe_serialization=True), metadata)


def write_model_dir(path: str | Path, fill, metadata: dict | None = None) -> str:
    """Atomically write a model directory with `fill(tmp)`, plus its digest marker; returns the digest."""
    with atomic_directory(path) as tmp:
        fill(tmp)
        digest = directory_digest(tmp)
        (tmp / DIGEST_FILE).write_text(json.dumps({"sha256": digest, **(metadata or {})}, indent=2, sort_keys=True))
    return digest


def model_digest(path: str | Path) -> str:
    """The digest recorded at save time, or computed now for a directory retrack did not write."""
    marker = Path(path) / DIGEST_FILE
    if marker.is_file():
        return json.loads(marker.read_text())["sha256"]
    return directory_digest(path)
