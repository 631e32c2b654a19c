"""Unconditional sampling with the reverse-time Euler-Maruyama solver (Song et al., 2021, Alg. 1 VP).

``x_1 ~ N(0, I)``; for ``t_i`` from 1 down to ``eps`` (uniform grid, ``dt = (1 - eps) / N``):
``x <- x + (1/2 beta x + beta score) dt + sqrt(beta dt) z`` with ``score = -e_theta / s_t``.
After the last step the Tweedie estimate ``x0_hat = (x - s_t e_theta) / a_t`` at ``t = eps`` removes
the remaining noise (one extra network evaluation, "denoise=True").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.diffusion.sde import VPSDE, _bcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_fn(model: nn.Module, sde: VPSDE) -> ScoreFn:
    """Wrap an epsilon-prediction network as a score function ``score(x_t, t) = -e_theta / s_t``."""
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -model(x, t) / _bcast(sde.sigma(t), x)
    return score


def x0_from_eps(sde: VPSDE, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                move: torch.Tensor | None = None) -> torch.Tensor:
    """Tweedie's formula, the one place it is written: ``x0_hat = (x_t - s_t e) / a_t`` for the noise
    ``e`` an epsilon-network predicted at ``(x_t, t)``; ``t`` is a scalar or one time per row.

    ``move``: the estimate after a guidance step ``x_t <- x_t - move`` taken with the same ``e``,
    ``(x_t - s_t e - move) / a_t`` (the joint sampler's result)."""
    x0 = torch.addcmul(x, _bcast(sde.sigma(t), x), eps, value=-1.0)  # one new tensor, no temporary
    if move is not None:
        x0.sub_(move)
    return x0.div_(_bcast(sde.alpha(t), x))


def eps_from_x0(sde: VPSDE, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`x0_from_eps`: the noise ``e = (x_t - a_t x0) / s_t`` that explains ``x0``."""
    return torch.addcmul(x, _bcast(sde.alpha(t), x), x0, value=-1.0).div_(_bcast(sde.sigma(t), x))


def tweedie(model: nn.Module, sde: VPSDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0_hat = (x_t - s_t e_theta(x_t, t)) / a_t``."""
    return x0_from_eps(sde, x, model(x, t), t)


@torch.no_grad()
def euler_maruyama(score: ScoreFn, sde: VPSDE, shape: tuple[int, ...], n_steps: int,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                   callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Draw ``shape`` samples by integrating the reverse SDE from ``t=1`` to ``t=eps``.

    Returns ``x_eps`` (not denoised); see :func:`sample` for the network-space images.
    """
    x = sde.prior_sampling(shape, generator=generator, device=device)
    ts = sde.timesteps(n_steps, device=device)
    for i in range(n_steps):
        t = ts[i].expand(shape[0])
        dt = ts[i] - ts[i + 1]
        z = torch.randn(shape, generator=generator, device=device)
        x = sde.reverse_step(x, t, dt, score(x, t), z)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample(model: nn.Module, sde: VPSDE, n: int, n_steps: int = 500, seed: int = 0,
           batch_size: int = 64, device: torch.device | str = "cpu",
           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``n`` unconditional samples as images in [0, 1], shape (n, C, S, S), on the CPU."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        shape = (b, cfg.channels, cfg.image_size, cfg.image_size)
        x = euler_maruyama(score_fn(model, sde), sde, shape, n_steps, generator=g, device=device,
                           callback=(lambda i, _x: progress(1)) if progress else None)
        t = torch.full((b,), sde.eps, device=device)
        x0 = tweedie(model, sde, x, t)
        out.append(((x0.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)
