"""ReTrack: redirect the forget items' denoising trajectories toward their K nearest retained items."""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field

from retrack.models.schedule import sum_sq
from retrack.errors import InputError
from retrack.methods.base import DataRequirements, LossTerms, Method, MethodParams, UnlearnBatch, register
from retrack.methods.branches import denoise_together, noise, vanilla_loss
from retrack.methods.neighbour_sets import NeighbourSets


class ReTrackParams(MethodParams):
    lambda_: float = Field(0.005, alias="lambda", ge=0.0, le=1.0, description="Weight of the kNN term; the retain term gets 1 - lambda.")
    k: int = Field(10, ge=1, description="Number of nearest retained neighbours per forget item.")
    t_min: int = Field(0, ge=0, lt=1000, description=(
        "Smallest timestep of the forget branch (t ~ Uniform{t_min..T-1}); 0 is the paper's objective. "
        "At small t the kNN targets (x_t - gamma_t n_j) / sigma_t grow as 1 / sigma_t: they dominate the "
        "gradient, do not change where the sampler goes, and blur every sample's last steps (docs/experiments/embedded-benchmark.md, "
        "'Where the quality goes')."))


class KnnTarget(NamedTuple):
    """The kNN term's pieces for one forget batch, none of which depends on theta."""

    target: torch.Tensor  # sum_j p_j v_j, shaped like x_t
    spread: torch.Tensor  # sum_j p_j ||v_j - target||^2 per sample
    weights: torch.Tensor  # p_j, (batch, K)

    def loss(self, pred: torch.Tensor) -> torch.Tensor:
        """sum_j p_j ||pred - v_j||^2 per sample, taken as ||pred - target||^2 + spread."""
        return sum_sq(pred - self.target) + self.spread


def knn_target(schedule, xt: torch.Tensor, t: torch.Tensor, neighbours: torch.Tensor | NeighbourSets,
               neighbour_of: torch.Tensor | None = None) -> KnnTarget:
    """For v_j = (x_t - gamma_t n_j) / sigma_t: the posterior weights p_j = softmax_j(-||v_j||^2 / 2),
    the weighted target sum_j p_j v_j and the spread sum_j p_j ||v_j - target||^2.

    `neighbours` holds S neighbour sets (S, K, ...), or their NeighbourSets (what the drawer passes:
    prepared once per run); sample i uses set `neighbour_of[i]` (None: set i). A batch draws its
    forget items with replacement, so a few sets serve the whole batch and the (batch, K, ...)
    gather is never made.

    sum_j p_j ||eps_theta - v_j||^2 = ||eps_theta - target||^2 + spread, and only the first part
    depends on theta: the loss is taken in that form, so autograd never holds the (batch, K, ...)
    residuals. The v_j are not formed either: ||v_j||^2 expands into matrix products over the
    neighbours (K may be the whole retain set). The expansion is taken about each set's first
    neighbour and its terms are combined in float64: near t = 0 they are divided by
    sigma_t^2 ~ 1e-4, and near-duplicate neighbours differ by little.
    """
    sets = neighbours if isinstance(neighbours, NeighbourSets) else NeighbourSets.of(neighbours)
    b = len(xt)
    if neighbour_of is None:
        if len(sets) != b:
            raise ValueError(f"{len(sets)} neighbour sets for {b} forget samples and no neighbour_of")  # a caller bug, not user input
        neighbour_of = torch.arange(b, device=sets.device)
    # Full precision under mixed-precision training too: autocast would run the products in bf16/fp16.
    with torch.no_grad(), torch.autocast(xt.device.type, enabled=False):
        d = sets.diffs  # n_j - n_1 per set
        g, s = (c.double() for c in schedule.coefficients(t, 2))  # (B, 1) each
        dd = sets.sq_norms[neighbour_of]  # (B, K)
        y = xt.flatten(1).float() - g.float() * sets.anchor[neighbour_of]  # x_t - gamma_t n_1
        # The samples of each set, grouped with one sort (and one device sync for the counts).
        sizes = torch.bincount(neighbour_of, minlength=len(sets)).tolist()
        groups = [(j, rows) for j, rows in enumerate(torch.split(torch.argsort(neighbour_of), sizes)) if len(rows)]
        yd = y.new_empty(b, d.shape[1])
        for j, rows in groups:
            yd[rows] = y[rows] @ d[j].T
        sq_dist = y.double().square().sum(1, keepdim=True) - 2 * g * yd.double() + g.square() * dd  # ||x_t - gamma_t n_j||^2
        p = torch.softmax(-0.5 * sq_dist / s.square(), dim=1)
        mean_d = torch.empty_like(y)  # sum_j p_j (n_j - n_1)
        for j, rows in groups:
            mean_d[rows] = p[rows].to(d.dtype) @ d[j]
        target = ((y - g.float() * mean_d) / s.float()).view_as(xt).to(xt.dtype)
        # ||v_j - target||^2 = gamma_t^2 / sigma_t^2 ||n_j - sum_i p_i n_i||^2: the neighbours' weighted variance
        variance = ((p * dd).sum(1) - mean_d.double().square().sum(1)).clamp_min(0.0)
        spread = (g.square() / s.square()).squeeze(1) * variance
    return KnnTarget(target, spread.float(), p.float())


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
        knn = knn_target(self.schedule, f.xt, f.t, batch.neighbours, batch.neighbour_of)
        loss_knn = knn.loss(pred_f).mean()
        loss_retain = vanilla_loss(pred_r, r.eps)
        total = lam * loss_knn + (1.0 - lam) * loss_retain
        return LossTerms(
            losses={"loss": total},
            logs={"loss": total.item(), "loss_knn": loss_knn.item(), "loss_retain": loss_retain.item()},
        )
