"""Denoising score matching with epsilon-prediction (Ho et al., 2020; Song et al., 2021).

For ``x_0`` from the data, ``t ~ U(eps, 1)`` and ``e ~ N(0, I)``:
``x_t = a_t x_0 + s_t e`` and ``L = E || e_theta(x_t, t) - e ||^2`` (mean over pixels).
Minimising it makes ``-e_theta / s_t`` the score of ``p_t``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.diffusion.sde import VPSDE


def sample_times(batch: int, sde: VPSDE, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Stratified times in ``[eps, 1]``: one uniform draw per equal-width bin, shuffled.

    Same distribution as i.i.d. uniform times, with lower variance of the batch loss.
    """
    u = (torch.arange(batch, device=device) + torch.rand(batch, generator=generator, device=device)) / batch
    u = u[torch.randperm(batch, generator=generator, device=device)]
    return sde.eps + (1.0 - sde.eps) * u


def dsm_loss(model: nn.Module, sde: VPSDE, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Epsilon-prediction DSM loss at given times and noise (per sample if ``reduce=False``)."""
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + std * noise
    err = (model(xt, t) - noise) ** 2
    per_sample = err.flatten(1).mean(1)
    return per_sample.mean() if reduce else per_sample


def random_dsm_loss(model: nn.Module, sde: VPSDE, x0: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The training objective: DSM loss at random times and noise drawn from ``generator``."""
    t = sample_times(x0.shape[0], sde, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return dsm_loss(model, sde, x0, t, noise)


@torch.no_grad()
def heldout_loss(model: nn.Module, sde: VPSDE, x0: torch.Tensor, n_times: int = 10,
                 seed: int = 0, batch_size: int = 256) -> float:
    """DSM loss on held-out images at a fixed grid of ``n_times`` times, with fixed noise.

    Deterministic for given weights and images, so runs and checkpoints can be compared.
    """
    g = torch.Generator().manual_seed(seed)
    times = torch.linspace(sde.eps, 1.0, n_times)
    total, count = 0.0, 0
    for t_val in times:
        for start in range(0, x0.shape[0], batch_size):
            xb = x0[start:start + batch_size]
            noise = torch.randn(xb.shape, generator=g).to(xb.device)
            t = torch.full((xb.shape[0],), float(t_val), device=xb.device)
            total += float(dsm_loss(model, sde, xb, t, noise, reduce=False).sum())
            count += xb.shape[0]
    return total / count
