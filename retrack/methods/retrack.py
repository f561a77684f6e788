"""ReTrack: redirect the forget items' denoising trajectories toward their K nearest retained items."""

from __future__ import annotations

import torch
from pydantic import Field

from retrack.diffusion import sum_sq
from retrack.errors import InputError
from retrack.methods.base import DataRequirements, LossTerms, Method, MethodParams, UnlearnBatch, register
from retrack.methods.branches import denoise_together, noise, vanilla_loss


class ReTrackParams(MethodParams):
    lambda_: float = Field(0.005, alias="lambda", ge=0.0, le=1.0, description="Weight of the kNN term; the retain term gets 1 - lambda.")
    k: int = Field(10, ge=1, description="Number of nearest retained neighbours per forget item.")
    t_min: int = Field(0, ge=0, lt=1000, description=(
        "Smallest timestep of the forget branch (t ~ Uniform{t_min..T-1}); 0 is the paper's objective. "
        "At small t the kNN targets (x_t - gamma_t n_j) / sigma_t grow as 1 / sigma_t: they dominate the "
        "gradient, do not change where the sampler goes, and blur every sample's last steps (README, "
        "'Where the quality goes')."))


def knn_targets(schedule, xt: torch.Tensor, t: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v_j = (x_t - gamma_t n_j) / sigma_t and the posterior weights p_j = softmax_j(-||v_j||^2 / 2).

    The weights are Gaussian likelihoods of x_t under each neighbour and carry no gradient.
    """
    g, s = schedule.coefficients(t, neighbours.ndim)
    v = (xt.unsqueeze(1) - g * neighbours) / s
    with torch.no_grad():
        p = torch.softmax(-0.5 * sum_sq(v, start_dim=2), dim=1)
    return v, p


@register
class ReTrack(Method):
    name = "retrack"
    requirements = DataRequirements(retain=True, forget=True, neighbours=True)
    Params = ReTrackParams

    @classmethod
    def check_schedule(cls, params: ReTrackParams, num_steps: int) -> None:
        if params.t_min >= num_steps:
            raise InputError(f"retrack t_min {params.t_min} must be below the schedule's {num_steps} timesteps")

    def losses(self, denoise, batch: UnlearnBatch, generator) -> LossTerms:
        self.check_batch(batch)
        lam = self.params.lambda_
        f = noise(self.schedule, batch.forget, generator, t_min=self.params.t_min)
        r = noise(self.schedule, batch.retain, generator)
        pred_f, pred_r = denoise_together(denoise, [(f.xt, f.t, batch.forget_cond), (r.xt, r.t, batch.retain_cond)])
        v, p = knn_targets(self.schedule, f.xt, f.t, batch.neighbours)
        loss_knn = (p * sum_sq(pred_f.unsqueeze(1) - v, start_dim=2)).sum(1).mean()
        loss_retain = vanilla_loss(pred_r, r.eps)
        total = lam * loss_knn + (1.0 - lam) * loss_retain
        return LossTerms(
            losses={"loss": total},
            logs={"loss": total.item(), "loss_knn": loss_knn.item(), "loss_retain": loss_retain.item()},
        )
