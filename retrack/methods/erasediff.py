"""EraseDiff: descend the retain loss, corrected toward a uniform-noise target on the forget set."""

from __future__ import annotations

import torch
from pydantic import Field

from retrack.models.schedule import sum_sq
from retrack.methods.base import DataRequirements, LossTerms, Method, MethodParams, UnlearnBatch, register
from retrack.methods.branches import denoise_together, noise, vanilla_loss


class EraseDiffParams(MethodParams):
    eta: float = Field(1e-3, ge=0.0, description="Projection margin (1e-3 for pixel DDPMs, 1e-2 for Stable Diffusion).")


@register
class EraseDiff(Method):
    name = "erasediff"
    requirements = DataRequirements(retain=True, forget=True, neighbours=False)
    Params = EraseDiffParams

    def losses(self, denoise, batch: UnlearnBatch, generator) -> LossTerms:
        self.check_batch(batch)
        r = noise(self.schedule, batch.retain, generator)
        f = noise(self.schedule, batch.forget, generator)
        pred_r, pred_f = denoise_together(denoise, [(r.xt, r.t, batch.retain_cond), (f.xt, f.t, batch.forget_cond)])
        # The forget target is uniform on [0, 1), deliberately not Gaussian noise.
        u = torch.rand(pred_f.shape, generator=generator, device=pred_f.device, dtype=pred_f.dtype)
        main = vanilla_loss(pred_r, r.eps)
        corr = sum_sq(pred_f - u).mean()
        return LossTerms(losses={"main": main, "corr": corr}, logs={"loss": main.item(), "loss_retain": main.item(), "loss_corr": corr.item()})

    def combine(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        g_main, g_corr = grads["main"], grads["corr"]
        coef = torch.clamp(self.params.eta - torch.dot(g_main, g_corr) / g_corr.pow(2).sum().clamp_min(1e-30), min=0.0)
        return g_main + coef * g_corr
