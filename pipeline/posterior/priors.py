"""Priors with a closed-form score, for the ``gaussian`` baseline and for testing the sampler.

A per-pixel Gaussian prior ``x_0 ~ N(mu, v)`` (network units) gives a Gaussian marginal
``x_t ~ N(a_t mu, a_t^2 v + s_t^2)``, so the epsilon a perfect network would predict is
``e(x_t, t) = s_t (x_t - a_t mu) / (a_t^2 v + s_t^2)``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.diffusion.sde import VPSDE, _bcast


class GaussianPrior(nn.Module):
    """An epsilon-"network" for ``N(mean, var)`` data; ``mean`` and ``var`` broadcast to (C, H, W)."""

    def __init__(self, mean: torch.Tensor | float, var: torch.Tensor | float, sde: VPSDE):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("var", torch.as_tensor(var, dtype=torch.float32))
        self.sde = sde

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.sde.alpha(t), x)
        s = _bcast(self.sde.sigma(t), x)
        return s * (x - a * self.mean) / (a**2 * self.var + s**2)

    @classmethod
    def fit(cls, images01: torch.Tensor, sde: VPSDE, per_pixel: bool = False) -> GaussianPrior:
        """Moment-match [0, 1] training images (in network units): one mean/var, or one per pixel."""
        x = images01 * 2 - 1
        if per_pixel:
            return cls(x.mean(0), x.var(0).clamp_min(1e-4), sde)
        return cls(x.mean(), x.var().clamp_min(1e-4), sde)
