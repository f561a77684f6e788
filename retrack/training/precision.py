"""Mixed precision on GPU workers: autocast, and static loss scaling for fp16 (bf16 needs none)."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


class ScaledLosses:
    """Static loss scaling for fp16 autocast: losses x S before autograd, gradients / S before the
    method combines them (logs unscaled). Overflow shows up as a non-finite gradient (diverged)."""

    def __init__(self, method, scale: float):
        self.method, self.scale = method, scale
        self.requirements, self.name = method.requirements, method.name

    def losses(self, denoise, batch, generator):
        terms = self.method.losses(denoise, batch, generator)
        terms.losses = {k: v * self.scale for k, v in terms.losses.items()}
        return terms

    def combine(self, grads):
        return self.method.combine({k: g / self.scale for k, g in grads.items()})


def with_precision(method, use_gpu: bool, mixed_precision: str, fp16_loss_scale: float):
    """The method as the step should call it: loss-scaled under fp16 on GPU, else unchanged."""
    return ScaledLosses(method, fp16_loss_scale) if use_gpu and mixed_precision == "fp16" else method


def autocast(use_gpu: bool, mixed_precision: str) -> AbstractContextManager:
    """The step's forward-pass context: weights stay fp32, activations in bf16/fp16 on GPU."""
    if use_gpu and mixed_precision != "no":
        return torch.autocast("cuda", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
    return torch.autocast("cpu", enabled=False)
