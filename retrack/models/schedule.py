"""DDPM noising helpers shared by every method: the schedule comes from the model's own scheduler."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """`gamma[t] = sqrt(alphas_cumprod[t])`, `sigma[t] = sqrt(1 - alphas_cumprod[t])`."""

    gamma: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device | str = "cpu") -> "NoiseSchedule":
        acp = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        return cls(gamma=acp.sqrt(), sigma=(1.0 - acp).sqrt())

    @property
    def num_steps(self) -> int:
        return int(self.gamma.shape[0])

    def sample_t(self, n: int, generator: torch.Generator | None = None, low: int = 0) -> torch.Tensor:
        """t ~ Uniform{low..T-1}."""
        return torch.randint(low, self.num_steps, (n,), generator=generator, device=self.gamma.device)

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma_t and sigma_t broadcastable against a tensor with `ndim` dimensions (batch first)."""
        shape = (-1,) + (1,) * (ndim - 1)
        return self.gamma[t].view(shape), self.sigma[t].view(shape)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        g, s = self.coefficients(t, x0.ndim)
        return g * x0 + s * eps


def sum_sq(x: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """Squared L2 norm summed over every element from `start_dim` on (the reduction the λ values assume)."""
    return x.float().pow(2).flatten(start_dim).sum(-1)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
