"""The joint sampler against closed-form Gaussian posteriors, batch independence, and its gradients."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.unet import UNet, UNetConfig
from pipeline.posterior.forward import Blend, Sum
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import RULES, SamplerConfig, guidance, joint_sample, project, seed_for

SDE = VPSDE()
MU_X = torch.tensor([[0.4, -0.3], [0.1, 0.6]]).reshape(1, 2, 2)
MU_N = torch.tensor([[-0.5, 0.2], [0.3, -0.1]]).reshape(1, 2, 2)
V_X, V_N = 0.30, 0.20


def closed_form(forward, y01: torch.Tensor, sigma_y: float):
    """Posterior mean/var of x and n (network units) given y for N(MU, V) priors, per pixel."""
    cx, cn = forward.coef_x, forward.coef_n
    # y01 = cx (X + 1)/2 + cn (N + 1)/2 + sigma_y e  <=>  yt = cx X + cn N + 2 sigma_y e
    yt = 2 * y01 - cx - cn
    var_y = cx**2 * V_X + cn**2 * V_N + 4 * sigma_y**2
    innov = yt - cx * MU_X - cn * MU_N
    mean_x = MU_X + cx * V_X * innov / var_y
    mean_n = MU_N + cn * V_N * innov / var_y
    var_x = V_X - (cx * V_X) ** 2 / var_y
    var_n = V_N - (cn * V_N) ** 2 / var_y
    return mean_x, var_x, mean_n, var_n


@pytest.mark.parametrize("forward", [Blend(sigma_y=0.1, alpha=0.5), Blend(sigma_y=0.05, alpha=0.3),
                                     Sum(sigma_y=0.1)], ids=["blend0.5", "blend0.3", "sum"])
def test_joint_sampler_recovers_the_gaussian_posterior(forward):
    g = torch.Generator().manual_seed(0)
    x_true = MU_X + V_X**0.5 * torch.randn(MU_X.shape, generator=g)
    n_true = MU_N + V_N**0.5 * torch.randn(MU_N.shape, generator=g)
    y = forward.observe((x_true + 1) / 2, (n_true + 1) / 2, generator=g)
    k = 4000
    # the exact posterior SDE alone: the final projection (a point estimate's finish) is off
    cfg = SamplerConfig(rule="tweedie", schedule="sde", solver="euler-maruyama", steps=500, lambda_x=1.0, kappa_n=1.0,
                        data_var_x=V_X, data_var_n=V_N, final_projection=False)
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE,
                       y.expand(k, 1, 2, 2).reshape(k, 1, 2, 2), forward, cfg, generator=g)
    xs, ns = out.x * 2 - 1, out.n * 2 - 1  # back to network units
    mean_x, var_x, mean_n, var_n = closed_form(forward, y[0], forward.sigma_y)
    err_x = ((xs.mean(0) - mean_x) ** 2).mean().sqrt() / V_X**0.5
    err_n = ((ns.mean(0) - mean_n) ** 2).mean().sqrt() / V_N**0.5
    assert err_x < 0.1 and err_n < 0.1, (err_x, err_n)
    rel_x = (xs.var(0) / var_x - 1).abs().max()
    rel_n = (ns.var(0) / var_n - 1).abs().max()
    assert rel_x < 0.3 and rel_n < 0.3, (rel_x, rel_n, xs.var(0), var_x)


@pytest.mark.parametrize("broken", ["no guidance", "wrong sign"])
def test_a_broken_sampler_fails_the_gaussian_check(broken, monkeypatch):
    """Guidance switched off, or pushing away from the data, misses the closed-form posterior mean."""
    from pipeline.posterior import sampler as S

    forward = Blend(sigma_y=0.1, alpha=0.5)
    y = torch.full((1, 1, 2, 2), 0.9)
    k = 2000
    lam = 1.0
    if broken == "no guidance":
        lam = 0.0
    else:
        real = S.guidance

        def ascent(*args, **kw):
            ex, en, gx, gn, r = real(*args, **kw)
            return ex, en, -gx, -gn, r

        monkeypatch.setattr(S, "guidance", ascent)
    cfg = SamplerConfig(rule="tweedie", schedule="sde", solver="euler-maruyama", steps=200, lambda_x=lam, kappa_n=lam,
                        data_var_x=V_X, data_var_n=V_N, final_projection=False)
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE,
                       y.expand(k, 1, 2, 2).reshape(k, 1, 2, 2), forward, cfg,
                       generator=torch.Generator().manual_seed(0))
    mean_x, *_ = closed_form(forward, y[0], 0.1)
    assert ((out.x * 2 - 1).mean(0) - mean_x).pow(2).mean().sqrt() / V_X**0.5 > 0.3


class _TinyPrior(torch.nn.Module):
    """A stand-in for a trained prior: the exact N(0, 1) epsilon plus a small random U-Net.

    An untrained U-Net alone makes ``x0_hat = (x - s e) / a`` explode near t = 1 (1 / a_1 ~ 150),
    which no guidance survives; a trained network predicts ``e ~ s x`` there, as this one does.
    """

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.unet = UNet(UNetConfig(image_size=16, base_channels=8, channel_mults=[1, 2],
                                    attention_resolutions=[8]))
        with torch.no_grad():
            for p in self.unet.parameters():
                p.add_(0.05 * torch.randn_like(p))  # leave the zero init: a non-trivial Jacobian
        self.gauss = GaussianPrior(0.0, 1.0, SDE)
        self.eval()

    def forward(self, x, t):
        return self.gauss(x, t) + 0.1 * self.unet(x, t)


def _tiny_unet(seed: int) -> _TinyPrior:
    return _TinyPrior(seed)


@pytest.mark.parametrize("rule", ["tweedie", "dps", "projection"])
def test_result_does_not_depend_on_the_batch(rule):
    xm, nm = _tiny_unet(1), _tiny_unet(2)
    g = torch.Generator().manual_seed(5)
    y = torch.rand(8, 1, 16, 16, generator=g)
    ids = [f"img-{k}" for k in range(8)]
    cfg = SamplerConfig(rule=rule, steps=6, lambda_x=0.5, kappa_n=0.5, schedule="r2")
    seeds = [seed_for(i) for i in ids]
    together = joint_sample(xm, nm, SDE, y, Blend(), cfg, seeds=seeds)
    alone = joint_sample(xm, nm, SDE, y[3:4], Blend(), cfg, seeds=seeds[3:4])
    assert torch.allclose(together.x[3], alone.x[0], atol=1e-5)
    assert torch.allclose(together.n[3], alone.n[0], atol=1e-5)
    other = joint_sample(xm, nm, SDE, y[3:4], Blend(), cfg, seeds=[seed_for("another-id")])
    assert not torch.allclose(other.x[0], alone.x[0], atol=1e-3)


def test_vjp_gradients_match_finite_differences():
    xm, nm = _tiny_unet(3), _tiny_unet(4)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    n = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    y = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    xm, nm = xm.double(), nm.double()
    xm.gauss.sde = nm.gauss.sde = SDE
    t = torch.full((2,), 0.4, dtype=torch.float64)
    for name in ("tweedie", "dps"):
        rule = RULES[name]
        cfg = SamplerConfig(rule=name)
        _, _, gx, gn, _ = guidance(rule, xm, nm, SDE, Blend(sigma_y=0.1), y, x, n, t, cfg)

        def loss(xv, nv, rule=rule, cfg=cfg):
            # the per-sample loss of sample 0, recomputed from scratch
            with torch.enable_grad():
                xv = xv.clone().requires_grad_(True)
                nv = nv.clone().requires_grad_(True)
            from pipeline.posterior import sampler as S
            a = SDE.alpha(t)[:, None, None, None]
            s = SDE.sigma(t)[:, None, None, None]
            x0 = (xv - s * xm(xv, t)) / a
            n0 = (nv - s * nm(nv, t)) / a
            r = y - Blend(sigma_y=0.1).apply(S._to01(x0), S._to01(n0))
            sq = r.pow(2).flatten(1).sum(1)
            if rule.loss == "norm":
                return float(torch.sqrt(sq + 1e-12)[0])
            sig2 = 0.01 + 0.25 * S._posterior_var01(SDE, t, 1.0) + 0.25 * S._posterior_var01(SDE, t, 1.0)
            return float((sq / (2 * sig2))[0])

        h = 1e-6
        for idx in [(0, 0, 3, 4), (0, 0, 8, 8), (0, 0, 15, 0)]:
            e = torch.zeros_like(x)
            e[idx] = h
            with torch.no_grad():
                fd_x = (loss(x + e, n) - loss(x - e, n)) / (2 * h)
                fd_n = (loss(x, n + e) - loss(x, n - e)) / (2 * h)
            assert gx[idx].item() == pytest.approx(fd_x, rel=1e-4, abs=1e-8), (name, idx)
            assert gn[idx].item() == pytest.approx(fd_n, rel=1e-4, abs=1e-8), (name, idx)
        assert gx[1].abs().sum() > 0 and torch.isfinite(gx).all()


def test_projection_runs_no_backward_pass_through_the_networks():
    class CountingNet(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.backward_calls = 0
            self.calls = 0

        def forward(self, x, t):
            self.calls += 1
            out = self.inner(x, t)
            if out.requires_grad:
                out.register_hook(self._count)
            return out

        def _count(self, grad):
            self.backward_calls += 1

    y = torch.rand(2, 1, 16, 16)
    for rule, expect_backward in (("projection", False), ("dps", True)):
        xm, nm = CountingNet(_tiny_unet(1)), CountingNet(_tiny_unet(2))
        out = joint_sample(xm, nm, SDE, y, Blend(), SamplerConfig(rule=rule, steps=3), seeds=[1, 2])
        assert out.backward is expect_backward
        assert (xm.backward_calls > 0) is expect_backward and (nm.backward_calls > 0) is expect_backward
        assert out.nfe == 3 == xm.calls == nm.calls  # NFE counts every network evaluation, and only those


@pytest.mark.parametrize("forward", [Blend(alpha=0.5), Blend(alpha=0.3), Sum()], ids=["blend0.5", "blend0.3", "sum"])
def test_projection_is_the_least_distance_move_onto_the_observation(forward):
    g = torch.Generator().manual_seed(3)
    x, n, y = (torch.rand(2, 1, 4, 4, generator=g) for _ in range(3))
    px, pn = project(forward, y, x, n)
    assert torch.allclose(forward.apply(px, pn), y, atol=1e-6)
    # the smallest (dx, dn) with c_x dx + c_n dn = r is proportional to (c_x, c_n): no other move is shorter
    dx, dn = px - x, pn - n
    assert torch.allclose(dx * forward.coef_n, dn * forward.coef_x, atol=1e-6)
    other_dx = dx + 0.1 * forward.coef_n
    other_dn = dn - 0.1 * forward.coef_x  # also explains y exactly, but is longer
    assert torch.allclose(forward.apply(x + other_dx, n + other_dn), y, atol=1e-6)
    assert (dx.pow(2) + dn.pow(2)).sum() < (other_dx.pow(2) + other_dn.pow(2)).sum()


def test_projection_leaves_the_read_out_noise_in_place():
    """With sigma_y > 0 a residual at the read-out noise level is left alone; a larger one is cut to it."""
    g = torch.Generator().manual_seed(4)
    fwd = Blend(sigma_y=0.05, alpha=0.5)
    x, n = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    r = torch.randn(2, 1, 8, 8, generator=g)
    r = r / r.pow(2).flatten(1).mean(1).sqrt().reshape(2, 1, 1, 1) * torch.tensor([0.04, 0.2]).reshape(2, 1, 1, 1)
    px, pn = project(fwd, fwd.apply(x, n) + r, x, n)
    assert torch.equal(px[0], x[0]) and torch.equal(pn[0], n[0])  # 0.04 < sigma_y: untouched
    left = (fwd.apply(x, n) + r - fwd.apply(px, pn))[1].pow(2).mean().sqrt()
    assert abs(left.item() - 0.05) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_solver_samples_the_prior_when_guidance_is_off(eta):
    """Without guidance both variables follow their priors, for deterministic and ancestral DDIM; a
    solver that skipped the noise term (or the prediction) would shrink the variance or shift the mean.
    The variance converges from below as steps grow (ancestral, 100 steps: 0.89 of the prior's; 400: 0.94)."""
    k = 4000
    cfg = SamplerConfig(solver="ddim", eta=eta, steps=400, lambda_x=0.0, kappa_n=0.0, final_projection=False,
                        clip_denoised=False)  # these priors reach beyond [-1, 1]: the bare solver
    y = torch.zeros(k, 1, 2, 2)
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE, y, Blend(), cfg,
                       generator=torch.Generator().manual_seed(0))
    for z, mu, v in ((out.x * 2 - 1, MU_X, V_X), (out.n * 2 - 1, MU_N, V_N)):
        assert ((z.mean(0) - mu) ** 2).mean().sqrt() / v**0.5 < 0.05
        assert (z.var(0) / v - 1).abs().max() < 0.1


def test_ddim_eta_sets_how_much_fresh_noise_enters():
    """eta = 0 maps the starting noise to the sample deterministically (for a Gaussian prior, almost
    linearly: correlation ~1); eta = 1 adds fresh noise at every step, so the start matters less."""
    k = 2000
    corr = {}
    for eta in (0.0, 1.0):
        cfg = SamplerConfig(solver="ddim", eta=eta, steps=50, lambda_x=0.0, kappa_n=0.0, final_projection=False,
                            clip_denoised=False)
        out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE,
                           torch.zeros(k, 1, 2, 2), Blend(), cfg, generator=torch.Generator().manual_seed(0))
        x_start = torch.randn((k, 1, 2, 2), generator=torch.Generator().manual_seed(0))  # the sampler's first draw
        a, b = x_start.flatten(), (out.x * 2 - 1 - MU_X).flatten()
        corr[eta] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert corr[0.0] > 0.99 and corr[1.0] < 0.5, corr


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clipping_keeps_samples_in_the_data_range_and_changes_nothing_inside_it(eta):
    """``clip_denoised`` clips Tweedie's estimate to [-1, 1] at every DDIM step: a prior of standard deviation
    2 is then sampled inside the data range (up to the last step's own small move), where the bare solver
    spreads it over [-6, 6]; a prior whose estimates stay inside the range is sampled exactly as without it."""
    k = 1000

    def sample(mu: float, var: float, clip: bool) -> torch.Tensor:
        cfg = SamplerConfig(solver="ddim", eta=eta, steps=50, lambda_x=0.0, kappa_n=0.0, final_projection=False,
                            clip_denoised=clip)
        prior = GaussianPrior(torch.full((1, 2, 2), mu), var, SDE)
        out = joint_sample(prior, prior, SDE, torch.zeros(k, 1, 2, 2), Blend(), cfg,
                           generator=torch.Generator().manual_seed(0))
        return out.x * 2 - 1

    wide_bare, wide_clipped = sample(0.0, 4.0, False), sample(0.0, 4.0, True)
    assert wide_bare.std() > 1.8 and wide_bare.abs().max() > 4
    assert wide_clipped.abs().max() < 1.05 and wide_clipped.std() > 0.5
    narrow = (sample(0.2, 0.01, False), sample(0.2, 0.01, True))
    assert torch.allclose(*narrow, atol=1e-5)
