"""The joint sampler against closed-form Gaussian posteriors, batch independence (also across per-row
alphas), its gradients, and its registries (rules, schedules, solvers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.unet import UNet, UNetConfig
from pipeline.forward import make_forward
from pipeline.posterior import guidance as G
from pipeline.posterior.guidance import RULES, GuidedDenoiser, register_rule
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import SamplerSettings, joint_sample, project, seed_for
from tests.conftest import exact_gaussian

SDE = VPSDE()
MU_X = torch.tensor([[0.4, -0.3], [0.1, 0.6]]).reshape(1, 2, 2)
MU_N = torch.tensor([[-0.5, 0.2], [0.3, -0.1]]).reshape(1, 2, 2)
V_X, V_N = 0.30, 0.20


def blend(b: int = 1, alpha: float | list[float] = 0.5, sigma_y: float = 0.0):
    return make_forward("blend", b, alpha=alpha, sigma_y=sigma_y)


def plain(b: int = 1, sigma_y: float = 0.0):
    return make_forward("sum", b, sigma_y=sigma_y)


def Settings(**kw) -> SamplerSettings:  # noqa: N802  (weights given: the sampler runs without the table)
    return SamplerSettings(**{"lambda_x": 20.0, "kappa_n": 20.0, **kw})


def closed_form(forward, y01: torch.Tensor, sigma_y: float):
    """Posterior mean/var of x and n (network units) given y for N(MU, V) priors, per pixel."""
    cx, cn = float(forward.coef_x[0]), float(forward.coef_n[0])
    # y01 = cx (X + 1)/2 + cn (N + 1)/2 + sigma_y e  <=>  yt = cx X + cn N + 2 sigma_y e
    yt = 2 * y01 - cx - cn
    var_y = cx**2 * V_X + cn**2 * V_N + 4 * sigma_y**2
    innov = yt - cx * MU_X - cn * MU_N
    mean_x = MU_X + cx * V_X * innov / var_y
    mean_n = MU_N + cn * V_N * innov / var_y
    var_x = V_X - (cx * V_X) ** 2 / var_y
    var_n = V_N - (cn * V_N) ** 2 / var_y
    return mean_x, var_x, mean_n, var_n


@pytest.mark.parametrize("forward", [blend(sigma_y=0.1, alpha=0.5), blend(sigma_y=0.05, alpha=0.3),
                                     plain(sigma_y=0.1)], ids=["blend0.5", "blend0.3", "sum"])
def test_joint_sampler_recovers_the_gaussian_posterior(forward):
    g = torch.Generator().manual_seed(0)
    x_true = MU_X + V_X**0.5 * torch.randn(MU_X.shape, generator=g)
    n_true = MU_N + V_N**0.5 * torch.randn(MU_N.shape, generator=g)
    y = forward.observe((x_true + 1) / 2, (n_true + 1) / 2, generator=g)
    k = 4000
    # the exact posterior SDE alone: the final projection (a point estimate's finish) is off
    cfg = SamplerSettings(rule="exact-gaussian", schedule="sde", solver="euler-maruyama", steps=500, lambda_x=1.0,
                          kappa_n=1.0, data_var_x=V_X, data_var_n=V_N, final_projection=False)
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE,
                       y.expand(k, 1, 2, 2).reshape(k, 1, 2, 2), forward.repeat(k), cfg, generator=g)
    xs, ns = out.x * 2 - 1, out.n * 2 - 1  # back to network units
    mean_x, var_x, mean_n, var_n = closed_form(forward, y[0], float(forward.sigma_y[0]))
    err_x = ((xs.mean(0) - mean_x) ** 2).mean().sqrt() / V_X**0.5
    err_n = ((ns.mean(0) - mean_n) ** 2).mean().sqrt() / V_N**0.5
    assert err_x < 0.1 and err_n < 0.1, (err_x, err_n)
    rel_x = (xs.var(0) / var_x - 1).abs().max()
    rel_n = (ns.var(0) / var_n - 1).abs().max()
    assert rel_x < 0.3 and rel_n < 0.3, (rel_x, rel_n, xs.var(0), var_x)


@pytest.fixture
def scratch_rules():
    """Rules a test registers are removed after it (the registry is global)."""
    before = set(RULES.names())
    yield
    for name in set(RULES.names()) - before:
        RULES.unregister(name)


@pytest.mark.parametrize("broken", ["no guidance", "wrong sign"])
def test_a_broken_sampler_fails_the_gaussian_check(broken, scratch_rules):
    """Guidance switched off, or pushing away from the data, misses the closed-form posterior mean."""
    forward = blend(sigma_y=0.1, alpha=0.5)
    y = torch.full((1, 1, 2, 2), 0.9)
    k = 2000
    @register_rule("gaussian-ascent")  # a broken rule: the exact-gaussian gradients with the wrong sign
    def ascent(d, x, n, t):
        g = exact_gaussian(d, x, n, t)
        return dataclasses.replace(g, grad_x=-g.grad_x, grad_n=-g.grad_n)

    lam, rule = (0.0, "exact-gaussian") if broken == "no guidance" else (1.0, "gaussian-ascent")
    cfg = SamplerSettings(rule=rule, schedule="sde", solver="euler-maruyama", steps=200, lambda_x=lam, kappa_n=lam,
                          data_var_x=V_X, data_var_n=V_N, final_projection=False)
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE,
                       y.expand(k, 1, 2, 2).reshape(k, 1, 2, 2), forward.repeat(k), cfg,
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


@pytest.mark.parametrize("rule", ["exact-gaussian", "dps", "projection"])
def test_result_does_not_depend_on_the_batch(rule):
    xm, nm = _tiny_unet(1), _tiny_unet(2)
    g = torch.Generator().manual_seed(5)
    y = torch.rand(8, 1, 16, 16, generator=g)
    ids = [f"img-{k}" for k in range(8)]
    cfg = SamplerSettings(rule=rule, steps=6, lambda_x=0.5, kappa_n=0.5, schedule="r2")
    seeds = [seed_for(i) for i in ids]
    together = joint_sample(xm, nm, SDE, y, blend(8), cfg, seeds=seeds)
    alone = joint_sample(xm, nm, SDE, y[3:4], blend(1), cfg, seeds=seeds[3:4])
    assert torch.allclose(together.x[3], alone.x[0], atol=1e-5)
    assert torch.allclose(together.n[3], alone.n[0], atol=1e-5)
    other = joint_sample(xm, nm, SDE, y[3:4], blend(1), cfg, seeds=[seed_for("another-id")])
    assert not torch.allclose(other.x[0], alone.x[0], atol=1e-3)


@pytest.mark.parametrize("rule", ["exact-gaussian", "dps"])
def test_a_batch_may_mix_alphas(rule):
    """Rows with different alphas (and read-out noise) in one batch give, row by row, what each row gives
    alone with its own alpha: Sigma_t, the guidance, the final projection and the removed energy are per row."""
    from pipeline.posterior.denoise import Denoiser

    xm, nm = _tiny_unet(1), _tiny_unet(2)
    g = torch.Generator().manual_seed(6)
    y = torch.rand(2, 1, 16, 16, generator=g)
    ids, alphas, sig = ["img-a", "img-b"], [0.3, 0.7], [0.05, 0.0]
    cfg = SamplerSettings(rule=rule, steps=5, lambda_x=0.5, kappa_n=0.5, schedule="r2", n_samples=2)
    den = Denoiser(xm, nm, SDE, cfg)
    mixed = den(ids, y, make_forward("blend", 2, alpha=alphas, sigma_y=sig))
    for i in range(2):
        alone = den(ids[i:i + 1], y[i:i + 1], blend(1, alphas[i], sig[i]))
        for name in ("denoised", "noise_estimate", "uncertainty", "residual", "removed_energy"):
            torch.testing.assert_close(getattr(mixed, name)[i], getattr(alone, name)[0], rtol=0, atol=1e-5)
    # and the alpha matters: row 0 under row 1's alpha is another result
    swapped = den(ids[:1], y[:1], blend(1, alphas[1], sig[0]))
    assert (swapped.denoised[0] - mixed.denoised[0]).abs().max() > 1e-2


def test_vjp_gradients_match_finite_differences():
    xm, nm = _tiny_unet(3), _tiny_unet(4)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    n = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    y = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    xm, nm = xm.double(), nm.double()
    xm.gauss.sde = nm.gauss.sde = SDE
    t = torch.full((2,), 0.4, dtype=torch.float64)
    fwd = blend(2, sigma_y=0.1)
    for name in ("exact-gaussian", "dps"):
        d = GuidedDenoiser(xm, nm, SDE, fwd, y, Settings(rule=name))
        g = RULES[name].fn(d, x, n, t)
        gx, gn = g.grad_x, g.grad_n

        def loss(xv, nv, name=name):
            # the per-sample loss of sample 0, recomputed from scratch
            a = SDE.alpha(t)[:, None, None, None]
            s = SDE.sigma(t)[:, None, None, None]
            x0 = (xv - s * xm(xv, t)) / a
            n0 = (nv - s * nm(nv, t)) / a
            r = y - fwd.apply(G.to01(x0), G.to01(n0))
            sq = r.pow(2).flatten(1).sum(1)
            if name == "dps":
                return float(torch.sqrt(sq + 1e-12)[0])
            sig2 = 0.01 + 0.25 * G.posterior_var01(SDE, t, 1.0) + 0.25 * G.posterior_var01(SDE, t, 1.0)
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
        out = joint_sample(xm, nm, SDE, y, blend(2), Settings(rule=rule, steps=3), seeds=[1, 2])
        assert out.backward is expect_backward
        assert (xm.backward_calls > 0) is expect_backward and (nm.backward_calls > 0) is expect_backward
        assert out.nfe == 3 == xm.calls == nm.calls  # NFE counts every network evaluation, and only those


@pytest.mark.parametrize("forward", [blend(2, 0.5), blend(2, [0.3, 0.8]), plain(2),
                                     make_forward("overlay", 2, a=[0.5, 2.0])],
                         ids=["blend0.5", "blend-mixed", "sum", "overlay"])
def test_projection_is_the_least_distance_move_onto_the_observation(forward):
    g = torch.Generator().manual_seed(3)
    x, n, y = (torch.rand(2, 1, 4, 4, generator=g) for _ in range(3))
    px, pn = project(forward, y, x, n)
    assert torch.allclose(forward.apply(px, pn), y, atol=1e-6)
    # the smallest (dx, dn) with c_x dx + c_n dn = r is proportional to (c_x, c_n): no other move is shorter
    dx, dn = px - x, pn - n
    cx, cn = forward.coef_x.reshape(2, 1, 1, 1), forward.coef_n.reshape(2, 1, 1, 1)
    assert torch.allclose(dx * cn, dn * cx, atol=1e-6)
    other_dx = dx + 0.1 * cn
    other_dn = dn - 0.1 * cx  # also explains y exactly, but is longer
    assert torch.allclose(forward.apply(x + other_dx, n + other_dn), y, atol=1e-6)
    assert (dx.pow(2) + dn.pow(2)).sum() < (other_dx.pow(2) + other_dn.pow(2)).sum()


def test_projection_leaves_the_read_out_noise_in_place():
    """With sigma_y > 0 a residual at the read-out noise level is left alone; a larger one is cut to it."""
    g = torch.Generator().manual_seed(4)
    fwd = blend(2, sigma_y=0.05, alpha=0.5)
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
    cfg = SamplerSettings(solver="ddim", eta=eta, steps=400, lambda_x=0.0, kappa_n=0.0, final_projection=False,
                          clip_denoised=False)  # these priors reach beyond [-1, 1]: the bare solver
    y = torch.zeros(k, 1, 2, 2)
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE, y, blend(k), cfg,
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
        cfg = SamplerSettings(solver="ddim", eta=eta, steps=50, lambda_x=0.0, kappa_n=0.0, final_projection=False,
                              clip_denoised=False)
        out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE,
                           torch.zeros(k, 1, 2, 2), blend(k), cfg, generator=torch.Generator().manual_seed(0))
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
        cfg = SamplerSettings(solver="ddim", eta=eta, steps=50, lambda_x=0.0, kappa_n=0.0, final_projection=False,
                              clip_denoised=clip)
        prior = GaussianPrior(torch.full((1, 2, 2), mu), var, SDE)
        out = joint_sample(prior, prior, SDE, torch.zeros(k, 1, 2, 2), blend(k), cfg,
                           generator=torch.Generator().manual_seed(0))
        return out.x * 2 - 1

    wide_bare, wide_clipped = sample(0.0, 4.0, False), sample(0.0, 4.0, True)
    assert wide_bare.std() > 1.8 and wide_bare.abs().max() > 4
    assert wide_clipped.abs().max() < 1.05 and wide_clipped.std() > 0.5
    narrow = (sample(0.2, 0.01, False), sample(0.2, 0.01, True))
    assert torch.allclose(*narrow, atol=1e-5)


def test_a_rule_is_one_function_and_its_registration(scratch_rules):
    """A rule defined here (one function, one registry call) is accepted by the config and runs through
    joint_sample; it is really called (its gradient, half of dps', moves the result)."""
    from pipeline.config import SamplerConfig

    calls = []

    def half_dps(d, x, n, t):
        calls.append(t[0].item())
        g = G.dps(d, x, n, t)
        return dataclasses.replace(g, grad_x=g.grad_x / 2, grad_n=g.grad_n / 2)

    register_rule("half-dps")(half_dps)
    settings = SamplerConfig(rule="half-dps", steps=3, lambda_x=2.0, kappa_n=2.0).settings()
    xm, nm = _tiny_unet(1), _tiny_unet(2)
    y = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    half = joint_sample(xm, nm, SDE, y, blend(2), settings, seeds=[1, 2])
    assert len(calls) == 3 and half.backward
    same = joint_sample(xm, nm, SDE, y, blend(2), Settings(rule="dps", steps=3, lambda_x=1.0, kappa_n=1.0),
                        seeds=[1, 2])
    torch.testing.assert_close(half.x, same.x, rtol=0, atol=1e-5)  # half the gradient at twice the weight


def test_unknown_names_are_refused_with_the_registered_ones():
    from pipeline.config import CleanConfig, ConfigError, load_config

    for key, value, listed in (("rule", "dsp", "dps, projection"), ("schedule", "r3", "constant, sde, r2"),
                               ("solver", "heun", "euler-maruyama, ddim")):
        with pytest.raises(ValueError, match=f"unknown .*{value}.*registered: {listed}"):
            SamplerSettings(**{key: value})
        with pytest.raises(ConfigError,
                           match=f"^invalid config: --set sampler.{key}=...: unknown .*registered: {listed}"):
            load_config(CleanConfig, None, [f"sampler.{key}={value}"])


def test_the_sampler_refuses_to_run_without_weights():
    with pytest.raises(ValueError, match="resolve_weights"):
        joint_sample(_tiny_unet(1), _tiny_unet(2), SDE, torch.rand(1, 1, 16, 16), blend(1), SamplerSettings(steps=2))


def test_sampler_config_is_built_from_the_settings_dataclass():
    """One declaration: the config file's SamplerConfig has exactly the dataclass's fields and defaults."""
    from pipeline.config import SamplerConfig

    fields = {f.name: f for f in dataclasses.fields(SamplerSettings)}
    assert list(SamplerConfig.model_fields) == list(fields)
    for name, f in fields.items():
        assert SamplerConfig.model_fields[name].default == f.default, name
    assert SamplerConfig().settings() == SamplerSettings()
    assert SamplerConfig(steps=7).nfe == 7 == SamplerSettings(steps=7).nfe


def test_tuned_weights_are_used_unless_given():
    from pipeline.posterior.tuned import load_table, lookup, resolve_weights

    table = load_table()
    default = SamplerSettings()
    assert (default.rule, default.solver, default.steps) == (table["default_rule"], table["default_sampler"]["solver"],
                                                             table["default_sampler"]["steps"])
    s, note = resolve_weights(default, "faces", "digits", "blend")
    assert note is None and (s.lambda_x, s.kappa_n) == (20.0, 20.0)  # DDIM 50 steps, tuned by bench nfe
    s, note = resolve_weights(SamplerSettings(solver="euler-maruyama", steps=600), "faces", "digits", "blend")
    assert note is None and (s.lambda_x, s.kappa_n) == (2.887, 1.444)
    s, note = resolve_weights(SamplerSettings(steps=100), "faces", "digits", "blend")
    assert note is None and (s.lambda_x, s.kappa_n) == (14.142, 14.142)  # --set sampler.steps=100 gets its own
    pr = SamplerSettings(rule="projection", solver="euler-maruyama", steps=200)
    assert resolve_weights(pr, "faces", "digits", "blend") == (dataclasses.replace(pr, lambda_x=2.0, kappa_n=2.0),
                                                               None)
    # tuned with another schedule, for other priors, other steps: the rule's default and a one-line note
    for settings, priors, command in (
            (dataclasses.replace(pr, schedule="sde"), ("faces", "digits"), "jointdiff bench tune --rules projection"),
            (SamplerSettings(steps=64), ("faces", "digits"), "jointdiff bench nfe --solvers ddim --steps 64"),
            (SamplerSettings(steps=20), ("natural", "stripes-rgb"), "jointdiff bench large --steps 20 --rules dps"),
            (SamplerSettings(), ("s3://bucket/prior", "digits"), "sampler.lambda_x")):
        s, note = resolve_weights(settings, *priors, "blend")
        assert (s.lambda_x, s.kappa_n) == RULES[settings.rule].weights
        assert note is not None and "\n" not in note and "no tuned weights" in note and command in note, note
    # given weights win, without a note; one given, the other from the table
    assert resolve_weights(SamplerSettings(lambda_x=1.0, kappa_n=2.0), "faces", "digits", "blend") == (
        SamplerSettings(lambda_x=1.0, kappa_n=2.0), None)
    s, _ = resolve_weights(SamplerSettings(lambda_x=3.0), "faces", "digits", "blend")
    assert (s.lambda_x, s.kappa_n) == (3.0, 20.0)
    assert lookup(SamplerSettings(eta=0.5), "faces", "digits", "blend") is None  # tuned at eta 1
    # bench large's picks: a composite recipe (projection, no final projection by default) gets its tuned weights
    from pipeline.config import CleanConfig

    c = CleanConfig.model_validate({"priors": {"image": "natural", "noise": "text"}, "forward": {"name": "composite"}})
    s, note = resolve_weights(c.sampler.settings(), "natural", "text", "composite")
    assert note is None and (s.rule, s.final_projection, s.lambda_x, s.kappa_n) == ("projection", False, 2.0, 40.0)


def test_tuning_records_into_the_table(tmp_path):
    from pipeline.posterior.tuned import TABLE, entry, load_table, record, resolve_weights

    path = tmp_path / "tuned.yaml"
    path.write_text(TABLE.read_text())
    before = load_table(path)
    new = SamplerSettings(steps=64, lambda_x=25.0, kappa_n=12.5)
    record([entry(new, "faces", "digits", "blend"),
            entry(dataclasses.replace(new, steps=50, lambda_x=21.0), "faces", "digits", "blend")], path,
           scores={"dps/64/25/12.5": 20.0})
    after = load_table(path)
    assert len(after["entries"]) == len(before["entries"]) + 1  # 64 added, 50 replaced
    assert after["scores"]["dps/64/25/12.5"] == 20.0 and len(after["scores"]) == len(before["scores"]) + 1
    assert path.read_text().startswith("# Guidance weights")
    s, note = resolve_weights(SamplerSettings(steps=64), "faces", "digits", "blend", table=after)
    assert note is None and (s.lambda_x, s.kappa_n) == (25.0, 12.5)
    s, _ = resolve_weights(SamplerSettings(), "faces", "digits", "blend", table=after)
    assert s.lambda_x == 21.0


def _mean_images(h: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    v, u = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, h), indexing="ij")
    return (0.6 * v).reshape(1, h, h), (0.6 * torch.sin(3 * u)).reshape(1, h, h)


def test_an_unknown_blend_weight_is_estimated_per_image_and_independent_of_the_batch():
    """Gaussian priors with distinct mean images and a small variance pin each observation's alpha (the moment
    estimate below is within 0.01 of it). Started from 0.5, each row's estimate moves to its own alpha; an image
    cleaned alone gets the same estimate and the same pixels as in a batch that mixes alphas; rows whose weight is
    given keep it."""
    mx, mn = _mean_images()
    var = 0.01
    g = torch.Generator().manual_seed(0)
    alphas = torch.tensor([0.25, 0.5, 0.75, 0.4])
    b = len(alphas)
    x = mx + var**0.5 * torch.randn(b, 1, 16, 16, generator=g)
    n = mn + var**0.5 * torch.randn(b, 1, 16, 16, generator=g)
    y = blend(b, alphas.tolist()).apply((x + 1) / 2, (n + 1) / 2)
    moments = ((y - (mx + 1) / 2) * (mn - mx) / 2).flatten(1).sum(1) / ((mn - mx) / 2).pow(2).flatten(1).sum(1)
    assert (moments - alphas).abs().max() < 0.01  # the data pin alpha
    cfg = Settings(rule="projection", lambda_x=4.0, kappa_n=4.0)
    seeds = [seed_for(f"i{i}") for i in range(b)]

    def run(rows, estimate, given=0.5):
        return joint_sample(GaussianPrior(mx, var, SDE), GaussianPrior(mn, var, SDE), SDE, y[rows],
                            blend(len(rows), given), cfg, seeds=[seeds[i] for i in rows], estimate=estimate)

    out = run(list(range(b)), torch.ones(b, dtype=torch.bool))
    err = (out.weight - alphas).abs()
    assert err.max() < 0.06, out.weight
    assert (err[[0, 2, 3]] < (alphas[[0, 2, 3]] - 0.5).abs() / 2).all()  # at least halfway from 0.5 to the truth
    alone = run([2], torch.ones(1, dtype=torch.bool))
    assert torch.equal(alone.weight, out.weight[2:3]) and torch.equal(alone.x, out.x[2:3])
    # a row with its weight given keeps it: only the others are estimated
    mixed = run(list(range(b)), torch.tensor([True, False, True, False]), given=alphas.tolist())
    assert mixed.weight[1] == alphas[1] and mixed.weight[3] == alphas[3]
    assert torch.equal(mixed.weight[[0, 2]], out.weight[[0, 2]])


def test_only_a_blends_weight_is_estimated():
    from pipeline.config import CleanConfig

    with pytest.raises(ValueError, match="forward.alpha=auto: the overlay model's weight cannot be estimated"):
        CleanConfig.model_validate({"forward": {"name": "overlay", "alpha": "auto"}})
    assert CleanConfig.model_validate({"forward": {"alpha": "auto"}}).forward.alpha == "auto"
    assert CleanConfig.model_validate({"forward": {"alpha": 0.3}}).forward.alpha == 0.3
