"""SISS: importance-sampled retain and forget losses on a mixture of both sets, gradient-subtracted."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from retrack.models.schedule import randn_like, sum_sq
from retrack.methods.base import DataRequirements, LossTerms, Method, MethodParams, UnlearnBatch, register


class SISSParams(MethodParams):
    lambda_: float = Field(0.5, alias="lambda", gt=0.0, lt=1.0, description="Probability that a mixture sample is noised from a forget item.")
    scale: float = Field(5.0, gt=0.0, description="C: the norm the forget gradient is rescaled to (5 MNIST, 500 CelebA, 750 SD).")


def importance_weights(d_x: torch.Tensor, d_a: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w_x = 1/((1-λ) + λ e^{d_x-d_a}), w_a = 1/((1-λ) e^{d_a-d_x} + λ), in log space so they never overflow."""
    log_keep, log_lam = math.log1p(-lam), math.log(lam)
    w_x = torch.exp(-torch.logaddexp(torch.full_like(d_x, log_keep), log_lam + d_x - d_a))
    w_a = torch.exp(-torch.logaddexp(log_keep + d_a - d_x, torch.full_like(d_x, log_lam)))
    return w_x, w_a


@register
class SISS(Method):
    name = "siss"
    requirements = DataRequirements(retain=True, forget=True, neighbours=False, paired=True)
    Params = SISSParams

    def losses(self, denoise, batch: UnlearnBatch, generator) -> LossTerms:
        self.check_batch(batch)
        x, a = batch.retain, batch.forget
        n = x.shape[0]
        t = self.schedule.sample_t(n, generator)
        eps = randn_like(x, generator)
        from_forget = torch.rand(n, generator=generator, device=x.device) < self.params.lambda_
        pick = from_forget.view((-1,) + (1,) * (x.ndim - 1))
        g, s = self.schedule.coefficients(t, x.ndim)
        xt = g * torch.where(pick, a, x) + s * eps
        cond = None
        if batch.retain_cond is not None:
            cond = torch.where(from_forget.view((-1,) + (1,) * (batch.retain_cond.ndim - 1)), batch.forget_cond, batch.retain_cond)
        pred = denoise(xt, t, cond)
        eps_x, eps_a = (xt - g * x) / s, (xt - g * a) / s
        with torch.no_grad():
            w_x, w_a = importance_weights(0.5 * sum_sq(eps_x), 0.5 * sum_sq(eps_a), self.params.lambda_)
        main = (w_x * sum_sq(pred - eps_x)).mean()
        corr = (w_a * sum_sq(pred - eps_a)).mean()
        return LossTerms(losses={"main": main, "corr": corr}, logs={"loss": main.item(), "loss_retain": main.item(), "loss_corr": corr.item()})

    def combine(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        g_corr = grads["corr"]
        return grads["main"] - (self.params.scale / g_corr.norm().clamp_min(1e-30)) * g_corr
