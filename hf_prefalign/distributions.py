"""Diagonal Gaussians over the latent z, computed in fp32.

Every module that reasons about densities (the posterior encoder, CLaP's KL and InfoNCE terms, the per-user prior of
Latent DPO) uses this one class, so log-densities are always float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents of size Z.

    Args:
        mean (`torch.Tensor` of shape `(..., Z)`): the means.
        logvar (`torch.Tensor` of shape `(..., Z)`): the log-variances.
    """

    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self) -> None:
        if self.mean.shape != self.logvar.shape:
            raise ValueError(
                f"mean and logvar must have the same shape, got {tuple(self.mean.shape)} and "
                f"{tuple(self.logvar.shape)}."
            )
        self.mean = self.mean.float()
        self.logvar = self.logvar.float()

    @classmethod
    def standard_normal(cls, shape: tuple[int, ...], device: torch.device | str | None = None) -> DiagonalGaussian:
        """N(0, I) with the given shape `(..., Z)`: the prior every user is measured against."""
        zeros = torch.zeros(shape, device=device)
        return cls(zeros, zeros.clone())

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, num_samples: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised samples: `(..., Z)`, or `(M, ..., Z)` when `num_samples=M`."""
        shape = self.mean.shape if num_samples is None else (num_samples, *self.mean.shape)
        noise = torch.randn(shape, device=self.mean.device, dtype=self.mean.dtype, generator=generator)
        return self.mean + self.std * noise

    def log_prob_per_dim(self, z: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-density of `z` (broadcast against `(..., Z)`), shape `(..., Z)`."""
        z = z.float()
        return -0.5 * (_LOG_2PI + self.logvar + (z - self.mean) ** 2 * torch.exp(-self.logvar))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of `z`, summed over the latent dimension: shape `(...)`."""
        return self.log_prob_per_dim(z).sum(-1)

    def kl_to_standard_normal(self) -> torch.Tensor:
        """Analytic KL(self || N(0, I)) per dimension, shape `(..., Z)`."""
        return 0.5 * (torch.exp(self.logvar) + self.mean**2 - 1.0 - self.logvar)


__all__ = ["DiagonalGaussian"]
