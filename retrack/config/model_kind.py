"""The one vocabulary of model kinds: what a job spec names, what the unlearn stage trains."""

from __future__ import annotations

from enum import StrEnum


class ModelKind(StrEnum):
    """A diffusers layout retrack can unlearn from."""

    PIXEL_DDPM = "pixel-ddpm"  # UNet2DModel + DDPMScheduler, denoising pixels
    STABLE_DIFFUSION = "stable-diffusion"  # StableDiffusionPipeline, the UNet denoising VAE latents

    @classmethod
    def parse(cls, name: str) -> "ModelKind":
        """A kind by its name or by the short name the CLI and the layout check use ('pixel', 'sd')."""
        for kind in cls:
            if name in (kind.value, kind.short):
                return kind
        raise ValueError(f"unknown model kind {name!r}: use {', '.join(k.value for k in cls)} (or {', '.join(k.short for k in cls)})")

    @property
    def short(self) -> str:
        """'pixel' or 'sd': the name the unlearn run key has recorded from the start (keeping it
        keeps old runs' hashes) and the CLI accepts."""
        return "pixel" if self is ModelKind.PIXEL_DDPM else "sd"

    @property
    def description(self) -> str:
        return "a pixel-space DDPM (UNet2DModel)" if self is ModelKind.PIXEL_DDPM else "a Stable Diffusion pipeline (UNet2DConditionModel)"
