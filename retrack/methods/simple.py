"""The one-gradient baselines: Vanilla (retain loss only) and NegGrad (gradient ascent on the forget set)."""

from __future__ import annotations

from retrack.methods.base import DataRequirements, LossTerms, Method, MethodParams, UnlearnBatch, register
from retrack.methods.branches import noise, vanilla_loss


class NoParams(MethodParams):
    pass


@register
class Vanilla(Method):
    name = "vanilla"
    requirements = DataRequirements(retain=True, forget=False, neighbours=False)
    Params = NoParams

    def losses(self, denoise, batch: UnlearnBatch, generator) -> LossTerms:
        self.check_batch(batch)
        r = noise(self.schedule, batch.retain, generator)
        loss = vanilla_loss(denoise(r.xt, r.t, batch.retain_cond), r.eps)
        return LossTerms(losses={"loss": loss}, logs={"loss": loss.item(), "loss_retain": loss.item()})


@register
class NegGrad(Method):
    name = "neggrad"
    requirements = DataRequirements(retain=False, forget=True, neighbours=False)
    Params = NoParams

    def losses(self, denoise, batch: UnlearnBatch, generator) -> LossTerms:
        self.check_batch(batch)
        f = noise(self.schedule, batch.forget, generator)
        loss = -vanilla_loss(denoise(f.xt, f.t, batch.forget_cond), f.eps)
        return LossTerms(losses={"loss": loss}, logs={"loss": loss.item(), "loss_forget": -loss.item()})
