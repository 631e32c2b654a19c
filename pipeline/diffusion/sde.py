"""The variance-preserving SDE (Song et al., "Score-Based Generative Modeling through SDEs", 2021).

Forward:   dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,   beta(t) = beta_min + t (beta_max - beta_min)
Marginal:  x_t = a_t x_0 + s_t e,   a_t = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min),
           s_t^2 = 1 - a_t^2
Score of the marginal, with an epsilon-predicting network: score = -e_theta(x_t, t) / s_t.
Tweedie:   x0_hat = (x_t - s_t e_theta) / a_t.
Reverse Euler-Maruyama step from t to t - dt (dt > 0):
           x <- x + (1/2 beta x + beta score) dt + sqrt(beta dt) z.

The blog post's displayed reverse step has sign slips; these are the correct equations, checked in
``tests/test_sde.py`` against the closed-form score of a Gaussian data distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE on ``t in [eps, 1]``; all methods broadcast over a batch of ``t``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        """``0 < beta_min < beta_max`` and ``0 < eps < 1``, all finite real numbers: a schedule outside these
        makes ``s_t`` zero or imaginary and the sampler quietly produces NaNs (``ValueError`` naming the field)."""
        for name in ("beta_min", "beta_max", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}: must be a number, got a {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"{name}: must be finite, got {v}")
        if not self.beta_min > 0:
            raise ValueError(f"beta_min: must be > 0, got {self.beta_min}")
        if not self.beta_max > self.beta_min:
            raise ValueError(f"beta_max: must be > beta_min ({self.beta_min}), got {self.beta_max}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps: must be in (0, 1), got {self.eps}")

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``a_t``, the mean coefficient of the marginal ``p(x_t | x_0)``."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``s_t = sqrt(1 - a_t^2)``, the standard deviation of the marginal."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``a_t x0`` and std ``s_t`` of ``p(x_t | x_0)`` (std broadcast to ``x0``'s rank)."""
        a = _bcast(self.alpha(t), x0)
        s = _bcast(self.sigma(t), x0)
        return a * x0, s

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``-1/2 beta x`` and diffusion ``sqrt(beta)`` of the forward SDE."""
        beta = _bcast(self.beta(t), x)
        return -0.5 * beta * x, torch.sqrt(beta)

    def prior_sampling(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def timesteps(self, n_steps: int, device: torch.device | str = "cpu", power: float = 1.0) -> torch.Tensor:
        """``n_steps + 1`` times from 1 down to ``eps``: the sampler steps from ``ts[i]`` to ``ts[i+1]``.

        ``power > 1`` packs the steps closer together near ``eps``: ``t_i = eps + (1 - eps) u_i^power``
        with ``u`` evenly spaced from 1 to 0.
        """
        u = torch.linspace(1.0, 0.0, n_steps + 1, device=device, dtype=torch.float64)
        return (self.eps + (1.0 - self.eps) * u**power).float()

    def reverse_step(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor | float,
                     score: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """One reverse Euler-Maruyama step from ``t`` to ``t - dt``; ``z=None`` drops the noise."""
        beta = _bcast(self.beta(t), x)
        x = x + (0.5 * beta * x + beta * score) * dt
        if z is not None:
            x = x + torch.sqrt(beta * dt) * z
        return x


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (or scalar) tensor to broadcast against ``like`` (B, C, H, W)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))
