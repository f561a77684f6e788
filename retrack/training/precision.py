"""Mixed precision: autocast (bf16 on CPU or GPU, fp16 on GPU; the weights stay fp32) and, for fp16,
dynamic loss scaling by `torch.amp.GradScaler`: an update whose gradients overflow is skipped and
the scale halved, and the scale doubles after `growth_interval` clean updates. bf16 has fp32's
range and needs no scaling."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, mixed_precision: str) -> AbstractContextManager:
    """The step's forward-pass context on `device_type` ('cpu' or 'cuda')."""
    if mixed_precision == "no":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=DTYPES[mixed_precision])


def loss_scaler(device_type: str, mixed_precision: str, init_scale: float) -> torch.amp.GradScaler | None:
    """The fp16 run's dynamic loss scale (None otherwise)."""
    return torch.amp.GradScaler(device_type, init_scale=init_scale) if mixed_precision == "fp16" else None
