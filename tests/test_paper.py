"""The ``paper`` preset: the authors' joint step on our VP SDE (pipeline.posterior.paper)."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench import quality
from pipeline.diffusion.sde import VPSDE
from pipeline.forward import make_forward
from pipeline.posterior.guidance import GuidedDenoiser
from pipeline.posterior.paper import AUTHORS, sample_paper
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import PRESETS, Noise, SamplerSettings, joint_sample
from pipeline.posterior.tuned import load_table

SDE = VPSDE()
CPU = torch.device("cpu")
MU_X = torch.tensor([[0.4, -0.3], [0.1, 0.6]]).reshape(1, 2, 2)
MU_N = torch.tensor([[-0.5, 0.2], [0.3, -0.1]]).reshape(1, 2, 2)
V_X, V_N = 0.30, 0.20


def Blend(alpha: float, rows: int = 1):  # noqa: N802 (reads as the forward model it builds)
    return make_forward("blend", rows, alpha=alpha)


def run_paper(xm, nm, sde, y, fw, steps, lam, kap, noise):
    """The paper solver alone, from ``x, n ~ N(0, I)`` drawn from ``noise`` (as the sampler draws them)."""
    s = SamplerSettings(**{**PRESETS["paper"], "steps": steps, "lambda_x": lam, "kappa_n": kap})
    fw = fw if fw.batch_size == y.shape[0] else fw.repeat(y.shape[0] // fw.batch_size)
    x, n = noise.randn(tuple(y.shape)), noise.randn(tuple(y.shape))
    return sample_paper(GuidedDenoiser(xm, nm, sde, fw, y, s), x, n, None, noise)


class _Mixing(torch.nn.Module):
    """``e(x, t) = s_t M x`` over the flattened pixels: a network whose Jacobian is not diagonal, so
    ``J^T 1 * r`` and the exact vector-Jacobian product ``J^T r`` differ."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = SDE.sigma(t).reshape(-1, 1)
        return (s * (x.flatten(1) @ self.m.T)).reshape(x.shape)


def test_one_step_matches_the_hand_computed_update():
    """Two evaluations: one guided step from t = 1, then the last predictor's mean, against the formulas
    of the module docstring with ``J`` written out (no autograd)."""
    g = torch.Generator().manual_seed(3)
    mx, mn = 0.3 * torch.randn(4, 4, generator=g), 0.3 * torch.randn(4, 4, generator=g)
    fw = Blend(alpha=0.3)
    y = torch.rand(1, 1, 2, 2, generator=g)
    lam, kap = 0.93, 0.88
    x_out, n_out = run_paper(_Mixing(mx), _Mixing(mn), SDE, y, fw, 2, lam, kap,
                                Noise(None, torch.Generator().manual_seed(7), CPU))

    draws = torch.Generator().manual_seed(7)
    x0, n0, zx, zn = (torch.randn(1, 1, 2, 2, generator=draws).flatten() for _ in range(4))
    ts = SDE.timesteps(2)
    t0, t1, t2 = ts[0], ts[1], ts[2]
    b0, b1 = SDE.beta(t0), SDE.beta(t1)
    dt0, dt1 = t0 - t1, t1 - t2
    a0, a1, a2 = SDE.alpha(t0), SDE.alpha(t1), SDE.alpha(t2)
    eye = torch.eye(4)

    def mean(v, m, beta, dt):  # x + (beta x / 2 + beta score) dt with score = -M x
        return v + (0.5 * beta * v - beta * (m @ v)) * dt

    xm, nm = mean(x0, mx, b0, dt0), mean(n0, mn, b0, dt0)
    jx = ((1 + 0.5 * b0 * dt0) * eye - b0 * dt0 * mx).T @ torch.ones(4)
    jn = ((1 + 0.5 * b0 * dt0) * eye - b0 * dt0 * mn).T @ torch.ones(4)
    res = 0.7 * (xm / a1 + 1) / 2 + 0.3 * (nm / a1 + 1) / 2 - y.flatten()
    # r_t^2 / Sigma_t = 1/2: the step is lambda a_t c (J^T 1) * res in network units
    x1 = xm + torch.sqrt(b0 * dt0) * zx - lam * a0 * 0.7 * jx * res
    n1 = nm + torch.sqrt(b0 * dt0) * zn - kap * a0 * 0.3 * jn * res
    torch.testing.assert_close(x_out.flatten(), mean(x1, mx, b1, dt1) / a2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n_out.flatten(), mean(n1, mn, b1, dt1) / a2, rtol=1e-5, atol=1e-6)


def _gaussian_case(alpha: float = 0.5):
    fw = Blend(alpha=alpha)
    g = torch.Generator().manual_seed(0)
    x_true = MU_X + V_X**0.5 * torch.randn(MU_X.shape, generator=g)
    n_true = MU_N + V_N**0.5 * torch.randn(MU_N.shape, generator=g)
    y = fw.apply((x_true + 1) / 2, (n_true + 1) / 2)
    # the exact posterior mean for N(MU, V) priors (network units): y01 = cx (X + 1)/2 + cn (N + 1)/2
    cx, cn = fw.coef_x, fw.coef_n
    innov = 2 * y - cx - cn - cx * MU_X - cn * MU_N
    var_y = cx**2 * V_X + cn**2 * V_N
    return fw, y, MU_X + cx * V_X * innov / var_y, MU_N + cn * V_N * innov / var_y


def test_the_mean_over_seeds_finds_the_gaussian_posterior_mean_and_explains_y():
    """Gaussian priors, a blend: with the authors' weights the mean of 400 draws lands near the exact
    posterior mean (the unguided sampler stays at the prior mean) and the residual of y shrinks."""
    fw, y, mean_x, mean_n = _gaussian_case()
    k = 400
    ys = y.expand(k, 1, 2, 2).contiguous()
    out = {}
    for lam, kap in [(0.0, 0.0), (AUTHORS["lambda_x"], AUTHORS["kappa_n"])]:
        x, n = run_paper(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE, ys, fw, 200,
                            lam, kap, Noise(None, torch.Generator().manual_seed(1), CPU))
        res = (fw.repeat(k).apply((x + 1) / 2, (n + 1) / 2) - ys).pow(2).mean().sqrt().item()
        err_x = (((x.mean(0) - mean_x) ** 2).mean().sqrt() / V_X**0.5).item()
        err_n = (((n.mean(0) - mean_n) ** 2).mean().sqrt() / V_N**0.5).item()
        out[lam] = res, err_x, err_n
    prior_err = (((MU_X - mean_x) ** 2).mean().sqrt() / V_X**0.5).item()
    (res0, ex0, _), (res1, ex1, en1) = out[0.0], out[AUTHORS["lambda_x"]]
    assert prior_err > 0.5 and ex0 > 0.5, (prior_err, ex0)  # the case is not trivial
    assert ex1 < 0.2 and en1 < 0.2, out
    assert res1 < 0.25 * res0, out


def test_a_row_does_not_depend_on_its_batch():
    fw, y, _, _ = _gaussian_case()
    ys = torch.cat([y + 0.1, y])
    priors = GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE)
    both = run_paper(*priors, SDE, ys, fw, 20, 0.93, 0.88, Noise([11, 12], None, CPU))
    alone = run_paper(*priors, SDE, y, fw, 20, 0.93, 0.88, Noise([12], None, CPU))
    torch.testing.assert_close(both[0][1:], alone[0])
    torch.testing.assert_close(both[1][1:], alone[1])


def test_joint_sample_runs_the_preset():
    fw, y, mean_x, _ = _gaussian_case()
    cfg = SamplerSettings(**{**PRESETS["paper"], "steps": 30, **AUTHORS})
    out = joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE, y, fw, cfg, seeds=[5])
    assert out.nfe == 30 and out.backward
    # the preset follows the authors' code to the end: no final projection onto y
    assert out.residual.item() > 1e-4
    assert PRESETS["paper"]["steps"] == 600 and PRESETS["paper"]["final_projection"] is False


@pytest.mark.parametrize("settings", [{"rule": "paper", "solver": "ddim"}, {"rule": "dps", "solver": "paper"}])
def test_rule_and_solver_paper_go_together(settings):
    fw, y, _, _ = _gaussian_case()
    with pytest.raises(ValueError, match="sampler.preset=paper"):
        joint_sample(GaussianPrior(MU_X, V_X, SDE), GaussianPrior(MU_N, V_N, SDE), SDE, y, fw,
                     SamplerSettings(steps=3, lambda_x=1.0, kappa_n=1.0, **settings), seeds=[5])


def test_the_quality_benchmark_runs_the_preset_at_its_own_steps_with_the_tuned_weights():
    table = load_table()
    plan = quality.joint_plan(table, ["dps", "paper"], [100, 200])
    methods = [(m, c.steps) for m, c in plan]
    assert methods == [("joint-dps", 100), ("joint-dps", 200), ("joint-paper", 600), ("joint-paper-authors", 600)]
    paper, authors = dict(plan)["joint-paper"], dict(plan)["joint-paper-authors"]
    assert (paper.lambda_x, paper.kappa_n) == (4.0, 3.785)  # re-tuned on validation: docs/bench/paper.md
    assert (authors.lambda_x, authors.kappa_n) == (AUTHORS["lambda_x"], AUTHORS["kappa_n"])
    with pytest.raises(ValueError, match="unknown guidance rule 'pgidm'"):
        quality.joint_plan(table, ["pgidm"], [100])
    # a quick (smoke) run takes the preset at the quick step count
    assert dict(quality.joint_plan(table, ["paper"], [10], quick=True))["joint-paper"].steps == 10
