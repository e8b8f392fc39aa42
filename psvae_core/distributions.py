"""Diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar))), as in LDM / diffusers."""
from __future__ import annotations

import math
from typing import Optional

import torch

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp: keeps exp(logvar) finite in low precision


class DiagonalGaussian:
    """Posterior over latents [B,C,h,w]. `kl()` and `nll()` sum over all non-batch dims -> [B].

    A deterministic posterior (RAE mode: the features themselves are the latent) has zero
    variance: `sample()` returns the mean and `kl()` is 0.
    """

    def __init__(self, mean: torch.Tensor, logvar: Optional[torch.Tensor] = None):
        self.mean = mean
        self.deterministic = logvar is None
        if self.deterministic:
            self.logvar = None
            self.var = self.std = torch.zeros_like(mean)
        else:
            self.logvar = logvar.clamp(*LOGVAR_RANGE)
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def from_parameters(cls, parameters: torch.Tensor) -> "DiagonalGaussian":
        """Split [B,2C,...] channel-wise into mean and logvar."""
        mean, logvar = parameters.chunk(2, dim=1)
        return cls(mean, logvar)

    def _dims(self):
        return tuple(range(1, self.mean.ndim))

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * noise; `noise` (standard normal, the shape of the mean) is drawn from
        `generator` unless given (the trainer passes its own, seeded per global batch)."""
        if self.deterministic:
            return self.mean
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> torch.Tensor:
        """KL(self || other), other = N(0, I) when None; summed per sample -> [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=self._dims())

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `x` under the posterior, summed per sample -> [B]."""
        if self.deterministic:
            raise ValueError("a deterministic posterior has no density")
        terms = math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=self._dims())
