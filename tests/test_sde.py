"""The VP-SDE against simulation and against a Gaussian data distribution with a known score."""

from __future__ import annotations

import torch

from pipeline.diffusion.sampling import euler_maruyama
from pipeline.diffusion.sde import VPSDE


def test_marginal_prob_matches_forward_simulation():
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    n, steps = 40_000, 500  # Euler-Maruyama at dt = 1/500: within 0.008 of the closed form here (1/2000: 0.010)
    x0 = torch.tensor([-0.8, 0.3, 1.0]).repeat(n, 1)
    x = x0.clone()
    ts = torch.linspace(0, 1, steps + 1)
    checks = {125: None, 250: None, 500: None}  # t = 0.25, 0.5, 1
    for i in range(steps):
        t = ts[i].expand(n)
        dt = float(ts[i + 1] - ts[i])
        drift, diff = sde.sde(x, t)
        x = x + drift * dt + diff * (dt ** 0.5) * torch.randn(x.shape, generator=g)
        if i + 1 in checks:
            checks[i + 1] = x.clone()
    for k, xt in checks.items():
        t = ts[k].expand(n)
        mean, std = sde.marginal_prob(x0, t)
        assert torch.allclose(xt.mean(0), mean[0], atol=0.02), (k, xt.mean(0), mean[0])
        assert torch.allclose(xt.std(0), std[0], atol=0.02), (k, xt.std(0), std[0])


def test_alpha_sigma_closed_form():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    a = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    assert torch.allclose(sde.alpha(t), a)
    assert torch.allclose(sde.sigma(t) ** 2 + a**2, torch.ones(3))


def test_reverse_sampler_with_closed_form_gaussian_score_recovers_data_distribution():
    """Data x0 ~ N(mu, s0^2) per pixel: p_t = N(a_t mu, a_t^2 s0^2 + s_t^2), score in closed form."""
    sde = VPSDE()
    mu = torch.tensor([0.5, -0.3, 0.0, 0.8]).reshape(1, 4, 1, 1)
    s0 = torch.tensor([0.2, 0.5, 0.1, 0.3]).reshape(1, 4, 1, 1)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = sde.alpha(t).reshape(-1, 1, 1, 1)
        s = sde.sigma(t).reshape(-1, 1, 1, 1)
        return -(x - a * mu) / (a**2 * s0**2 + s**2)

    g = torch.Generator().manual_seed(1)
    x = euler_maruyama(score, sde, (20_000, 4, 1, 1), n_steps=1000, generator=g)
    mean = x.mean(0, keepdim=True)
    var = x.var(0, keepdim=True)
    # at t = eps the marginal is N(a mu, a^2 s0^2 + s^2), within 0.2% of the data distribution
    t = torch.tensor([sde.eps])
    target_var = sde.alpha(t) ** 2 * s0**2 + sde.sigma(t) ** 2
    assert torch.allclose(mean, sde.alpha(t) * mu, atol=0.01), mean.flatten()
    rel = (var / target_var - 1).abs().max()
    assert rel < 0.05, (var.flatten(), target_var.flatten())


def test_reverse_step_follows_the_score():
    """dx = (1/2 beta x + beta score) dt: with score = -x the step shrinks x (the blog's sign slip grows it)."""
    sde = VPSDE()
    x = torch.ones(4, 1, 1, 1)
    t = torch.full((4,), 0.5)
    out = sde.reverse_step(x, t, 0.01, -x, None)
    beta = float(sde.beta(torch.tensor(0.5)))
    assert torch.allclose(out, torch.full_like(out, 1.0 - 0.5 * beta * 0.01))
