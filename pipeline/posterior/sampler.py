"""Joint posterior sampling of an image ``x`` and structured noise ``n`` from ``y = A(x, n)``.

Stevens et al., "Removing Structured Noise using Diffusion Models" (TMLR 2025), with the guidance of
DPS (Chung et al., 2023) and PiGDM (Song et al., 2023). Per step, from ``t`` to ``t - dt``:

1. both priors predict noise at once: ``e_x = e_theta(x_t, t)``, ``e_n = e_phi(n_t, t)``; Tweedie gives
   ``x0_hat = (x_t - s_t e_x) / a_t`` and ``n0_hat`` likewise;
2. residual ``r = y - A(x0_hat, n0_hat)`` (storage units, [0, 1] images) and a per-sample loss ``L``;
3. reverse Euler-Maruyama step of each variable under its own prior's score ``-e / s_t``;
4. data consistency: ``x <- x - lambda_x(t) grad_{x_t} L``, ``n <- n - kappa_n(t) grad_{n_t} L``,
   both gradients from one backward pass (a vector-Jacobian product through each network).

Guidance rules (:data:`RULES`):

* ``tweedie``: ``L = ||r||^2 / (2 Sigma_t)``, ``Sigma_t = sigma_y^2 + c_x^2 v_x(t) + c_n^2 v_n(t)``,
  ``v(t) = Var[x_0 | x_t] = v_0 sigma_t^2 / (v_0 + sigma_t^2)``, ``sigma_t = s_t / a_t`` (in [0, 1]
  units: network variances / 4). With ``v_0 = 1`` this is PiGDM's ``r_t^2``. For Gaussian priors
  and the ``sde`` schedule (``lambda(t) = beta(t) dt``) it is the exact posterior SDE, which
  ``tests/test_posterior.py`` checks against the closed-form posterior.
* ``dps``: ``L = ||r||`` per sample, i.e. the step is normalised by the residual norm.
* ``projection``: the ``dps`` loss with ``d x0_hat / d x_t`` taken as ``I / a_t``: no backward pass
  through the networks. Its weights do not carry over from the other rules.

Schedules multiply ``lambda_x`` / ``kappa_n`` by ``w(t)``: ``constant`` (1), ``sde`` (``beta(t) dt``),
``r2`` (``sigma_t^2 / (1 + sigma_t^2)``, as the authors' code scales the step) or ``pigdm`` (``a_t``).

The step of item 3 is Euler-Maruyama by default, or DDIM (``solver="ddim"``, stochasticity ``eta``).
The sampler evaluates the networks at ``steps`` times from 1 down to ``eps``; the last evaluation's
guided Tweedie estimate is the result, so NFE = ``steps`` per prior. ``final_projection`` then moves
``(x, n)`` the least distance that explains ``y`` (:func:`project`).

Every quantity is per sample and each sample's noise comes from its own generator, seeded from
its image id, so a result never depends on the rest of its batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline import metrics
from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.posterior.forward import ForwardModel


@dataclass(frozen=True)
class GuidanceRule:
    name: str
    loss: Literal["gaussian", "norm"]
    jacobian: Literal["network", "identity"]

    @property
    def backward(self) -> bool:
        """Whether the rule runs a backward pass through the networks."""
        return self.jacobian == "network"


RULES = {
    "tweedie": GuidanceRule("tweedie", "gaussian", "network"),
    "dps": GuidanceRule("dps", "norm", "network"),
    "projection": GuidanceRule("projection", "norm", "identity"),
}


class SamplerConfig(BaseModel):
    """How to sample the joint posterior. ``nfe = steps`` per prior per posterior sample."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["tweedie", "dps", "projection"] = "dps"
    steps: int = Field(200, ge=2, description="network evaluations per prior, from t = 1 down to t = eps")
    # defaults: the weights `jointdiff bench tune` found for dps at 200 steps (configs/guidance.yaml)
    lambda_x: float = Field(10.0, ge=0, description="data-consistency weight on the image")
    kappa_n: float = Field(5.0, ge=0, description="data-consistency weight on the noise")
    schedule: Literal["constant", "sde", "r2", "pigdm"] = "constant"
    solver: Literal["euler-maruyama", "ddim"] = "euler-maruyama"
    eta: float = Field(1.0, ge=0, le=1, description="ddim only: 0 deterministic, 1 ancestral (DDPM-like)")
    data_var_x: float = Field(1.0, gt=0, description="prior variance of x_0 (network units) for Sigma_t")
    data_var_n: float = Field(1.0, gt=0, description="prior variance of n_0 (network units) for Sigma_t")
    time_power: float = Field(1.0, ge=1, description="1: evenly spaced times; > 1: denser near t = 0")
    final_projection: bool = Field(True, description="end with the least-distance move onto y = A(x, n)")
    n_samples: int = Field(1, ge=1, description="posterior samples per image (mean and spread)")
    seed: int = 0

    @property
    def nfe(self) -> int:
        return self.steps


def seed_for(image_id: str, base_seed: int = 0, sample: int = 0) -> int:
    """A 63-bit seed from an image id: the same id always draws the same noise."""
    digest = hashlib.blake2b(f"{base_seed}/{sample}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _Noise:
    """Standard normal draws: one generator per sample (batch-independent) or one for the batch."""

    def __init__(self, seeds: Sequence[int] | None, generator: torch.Generator | None, device: torch.device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if seeds is not None else None
        self.generator = generator
        self.device = device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.gens is None:
            return torch.randn(shape, generator=self.generator).to(self.device)
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.gens]).to(self.device)


@dataclass
class JointResult:
    """Posterior draws in [0, 1] units (``x`` clean image, ``n`` noise), shape (B, C, H, W)."""

    x: torch.Tensor
    n: torch.Tensor
    residual: torch.Tensor  # per sample RMS of y - A(x, n) at the end, before the final projection
    nfe: int
    backward: bool


def _weight(schedule: str, sde: VPSDE, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    if schedule == "constant":
        return torch.ones_like(t)
    if schedule == "sde":
        return sde.beta(t) * dt
    if schedule == "pigdm":
        return sde.alpha(t)
    sig2 = (sde.sigma(t) / sde.alpha(t)) ** 2
    return sig2 / (1 + sig2)


def _posterior_var01(sde: VPSDE, t: torch.Tensor, v0: float) -> torch.Tensor:
    """Var[x_0 | x_t] for N(., v0) data, converted from network units to [0, 1] units."""
    sig2 = (sde.sigma(t) / sde.alpha(t)) ** 2
    return v0 * sig2 / (v0 + sig2) / 4.0


def _to01(z: torch.Tensor) -> torch.Tensor:
    return (z + 1.0) / 2.0


def guidance(rule: GuidanceRule, x_model: nn.Module, n_model: nn.Module, sde: VPSDE, forward: ForwardModel,
             y: torch.Tensor, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
             cfg: SamplerConfig) -> tuple[torch.Tensor, ...]:
    """One evaluation of both priors and the data-consistency gradients.

    Returns ``(e_x, e_n, grad_x, grad_n, r)``; the gradients are of the per-sample loss ``L``
    with respect to ``x_t`` and ``n_t``.
    """
    a = _bcast(sde.alpha(t), x)
    s = _bcast(sde.sigma(t), x)

    def loss(x0: torch.Tensor, n0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = y - forward.apply(_to01(x0), _to01(n0))
        sq = r.pow(2).flatten(1).sum(1)
        if rule.loss == "norm":
            return torch.sqrt(sq + 1e-12), r
        sigma2 = (forward.sigma_y**2 + forward.coef_x**2 * _posterior_var01(sde, t, cfg.data_var_x)
                  + forward.coef_n**2 * _posterior_var01(sde, t, cfg.data_var_n))
        return sq / (2 * sigma2), r

    if rule.jacobian == "network":
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ng = n.detach().requires_grad_(True)
            ex, en = x_model(xg, t), n_model(ng, t)
            per_sample, r = loss((xg - s * ex) / a, (ng - s * en) / a)
            # per-sample losses are independent, so the gradient of their sum is each one's gradient
            gx, gn = torch.autograd.grad(per_sample.sum(), [xg, ng])
        return ex.detach(), en.detach(), gx, gn, r.detach()
    with torch.no_grad():
        ex, en = x_model(x, t), n_model(n, t)
    with torch.enable_grad():
        x0 = ((x - s * ex) / a).requires_grad_(True)
        n0 = ((n - s * en) / a).requires_grad_(True)
        per_sample, r = loss(x0, n0)
        g0x, g0n = torch.autograd.grad(per_sample.sum(), [x0, n0])
    return ex, en, g0x / a, g0n / a, r.detach()


def _ddim_step(sde: VPSDE, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
               eta: float, noise: _Noise) -> torch.Tensor:
    """DDIM (Song et al., 2021) from ``t`` to ``t_next`` with stochasticity ``eta``."""
    a, s = sde.alpha(t), sde.sigma(t)
    a2, s2 = sde.alpha(t_next), sde.sigma(t_next)
    x0 = (x - s * e) / a
    c = eta * torch.sqrt((s2 / s) ** 2 * (1 - (a / a2) ** 2)).clamp_min(0) if eta > 0 else torch.zeros(())
    out = a2 * x0 + torch.sqrt((s2**2 - c**2).clamp_min(0)) * e
    return out + c * noise.randn(tuple(x.shape)) if eta > 0 else out


@torch.no_grad()
def joint_sample(x_model: nn.Module, n_model: nn.Module, sde: VPSDE, y: torch.Tensor, forward: ForwardModel,
                 cfg: SamplerConfig, seeds: Sequence[int] | None = None,
                 generator: torch.Generator | None = None,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> JointResult:
    """Draw one joint posterior sample ``(x, n)`` per observation in ``y`` ([0, 1] units, (B, C, H, W)).

    ``seeds`` (one per row; see :func:`seed_for`) make each row's result independent of its batch;
    without them, one ``generator`` serves the whole batch (faster; for tests and benchmarks).
    """
    rule = RULES[cfg.rule]
    device = y.device
    shape = tuple(y.shape)
    noise = _Noise(seeds, generator, device)
    x = noise.randn(shape)
    n = noise.randn(shape)
    # `steps` evaluations at `steps` times from 1 down to eps; the last one's guided Tweedie estimate is
    # the result, so the sampler makes exactly `steps` network evaluations per prior
    ts = sde.timesteps(cfg.steps - 1, device=device, power=cfg.time_power)
    for i in range(cfg.steps):
        t = ts[i].expand(shape[0])
        dt = ts[i] - ts[i + 1] if i + 1 < cfg.steps else (ts[i - 1] - ts[i] if i > 0 else ts[i] - sde.eps)
        ex, en, gx, gn, _ = guidance(rule, x_model, n_model, sde, forward, y, x, n, t, cfg)
        w = _bcast(_weight(cfg.schedule, sde, t, dt), x)
        if i + 1 == cfg.steps:
            a, s = _bcast(sde.alpha(t), x), _bcast(sde.sigma(t), x)
            x = (x - s * ex - cfg.lambda_x * w * gx) / a
            n = (n - s * en - cfg.kappa_n * w * gn) / a
        elif cfg.solver == "ddim":
            x = _ddim_step(sde, x, ex, ts[i], ts[i + 1], cfg.eta, noise) - cfg.lambda_x * w * gx
            n = _ddim_step(sde, n, en, ts[i], ts[i + 1], cfg.eta, noise) - cfg.kappa_n * w * gn
        else:
            s = _bcast(sde.sigma(t), x)
            x = sde.reverse_step(x, t, dt, -ex / s, noise.randn(shape)) - cfg.lambda_x * w * gx
            n = sde.reverse_step(n, t, dt, -en / s, noise.randn(shape)) - cfg.kappa_n * w * gn
        if callback is not None:
            callback(i, x, n)
    x0, n0 = _to01(x), _to01(n)
    # the residual is measured before the projection: how far the priors' estimate is from explaining y
    residual = metrics.residual(y, forward.apply(x0, n0))
    if cfg.final_projection:
        x0, n0 = project(forward, y, x0, n0)
    return JointResult(x0, n0, residual, cfg.nfe, rule.backward)


def project(forward: ForwardModel, y: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move ``(x, n)`` the least distance (``||dx||^2 + ||dn||^2``) that explains the residual of ``y``.

    With read-out noise, only the part of the residual above ``sigma_y`` is removed: per sample the
    correction is shrunk by ``max(0, 1 - sigma_y / rms(r))``, leaving a residual of RMS ``sigma_y``.
    """
    r = y - forward.apply(x, n)
    if forward.sigma_y > 0:
        rms = r.pow(2).flatten(1).mean(1).sqrt()
        r = r * _bcast((1 - forward.sigma_y / rms.clamp_min(1e-20)).clamp(0, 1), r)
    c = forward.coef_x**2 + forward.coef_n**2
    return x + forward.coef_x / c * r, n + forward.coef_n / c * r
