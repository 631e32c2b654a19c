"""Learning the image prior from the corrupted observations alone, by expectation-maximisation.

Joint diffusion needs a prior for clean images; the people who need a dataset cleaned often have only the
corrupted dataset and examples of the noise. DDPRISM (NeurIPS 2025) learns the image prior from the mixtures
themselves: starting from a simple prior, each round

* **E-step**: draws one joint posterior sample ``(x, n)`` per observation with the current image prior and the
  (known) noise prior: :func:`pipeline.posterior.sampler.joint_sample`. Samples, not posterior means: the refit
  must see the posterior's spread, or the prior's variance shrinks round after round (a refit on means converges
  to the variance of the means, below the data's);
* **M-step**: refits the image prior to those samples (for a diffusion prior: fine-tunes it on them; here, for
  the closed-form case, moment-matches a Gaussian).

Round 0 is a Gaussian fitted to the observations themselves, per pixel (:func:`observation_gaussian`). For
Gaussian priors and a linear forward model the iteration is classical EM (Monte-Carlo E-step), whose fixed point
is the maximum-likelihood Gaussian of the observations' marginal, known in closed form
(:func:`gaussian_mle`); ``tests/test_em.py`` checks that the iteration reaches it and that a refit on posterior
means does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.diffusion.sde import VPSDE
from pipeline.forward import ForwardModel
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import SamplerSettings, joint_sample

Refit = Callable[[torch.Tensor], Any]  # posterior samples of x ([0, 1] units, (N, C, H, W)) -> the next image prior


def observation_gaussian(y01: torch.Tensor, sde: VPSDE) -> GaussianPrior:
    """Round 0: a Gaussian with the observations' own per-pixel mean and variance (network units)."""
    return GaussianPrior.fit(y01, sde, per_pixel=True)


def refit_gaussian(sde: VPSDE) -> Refit:
    """The M-step for a Gaussian image prior: the samples' per-pixel mean and variance."""
    return lambda x01: GaussianPrior.fit(x01, sde, per_pixel=True)


@dataclass
class Round:
    prior: Any  # the image prior this round's samples refitted
    samples: torch.Tensor  # one posterior sample of x per observation, [0, 1] units


def em_round(x_prior: Any, n_prior: Any, sde: VPSDE, y01: torch.Tensor, forward: ForwardModel,
             settings: SamplerSettings, refit: Refit, seeds: Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> Round:
    """One EM round on the observations ``y01`` ([0, 1] units, (N, C, H, W); ``forward`` one row per observation):
    a posterior sample of ``x`` per observation under ``x_prior`` and ``n_prior``, and ``refit`` of them."""
    out = joint_sample(x_prior, n_prior, sde, y01, forward, settings, seeds=seeds, generator=generator)
    return Round(refit(out.x), out.x)


def noise_fit(n_model: Any, sde: VPSDE, noise01: torch.Tensor) -> float:
    """The figure without truth that tracks EM's rounds: the noise prior's denoising loss on noise estimates
    (``noise01``, [0, 1] units, (N, C, H, W)), at 20 fixed times with fixed noise, network units; lower is better.
    A poor image prior leaves image content in the noise estimates, which the noise prior finds unlikely."""
    from pipeline.diffusion.losses import heldout_loss

    with torch.no_grad():
        return heldout_loss(n_model, sde, noise01 * 2 - 1, n_times=20)


def gaussian_mle(y01: torch.Tensor, forward: ForwardModel, noise_mean: torch.Tensor | float,
                 noise_var: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel Gaussian ``N(mean, var)`` of ``x`` (network units) that makes the observations most likely
    under ``y = c_x x01 + c_n n01 + sigma_y e`` with ``n ~ N(noise_mean, noise_var)`` (network units) and one
    model for all rows: the fixed point of EM for Gaussian priors. In network units the model is
    ``2 y01 - c_x - c_n = c_x X + c_n N + 2 sigma_y e``, so the observations' moments give
    ``mean = (E[yt] - c_n mu_n) / c_x`` and ``var = (Var[yt] - c_n^2 v_n - 4 sigma_y^2) / c_x^2`` (population
    moments: the maximum-likelihood estimates)."""
    cx, cn, sy = float(forward.coef_x[0]), float(forward.coef_n[0]), float(forward.sigma_y[0])
    yt = 2 * y01 - cx - cn
    mean = (yt.mean(0) - cn * torch.as_tensor(noise_mean)) / cx
    var = (yt.var(0, unbiased=False) - cn**2 * torch.as_tensor(noise_var) - 4 * sy**2) / cx**2
    return mean, var.clamp_min(1e-4)  # few observations can leave less variance than the noise explains
