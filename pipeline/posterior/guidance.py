"""The guided joint denoiser: both priors at ``(x_t, n_t, t)``, Tweedie's estimates, data-consistency gradients.

:class:`GuidedDenoiser` is what every solver of :mod:`pipeline.posterior.sampler` calls once per step. It
hands the evaluation to the settings' guidance rule and scales the rule's gradients by the weights
``lambda_x`` / ``kappa_n`` and the schedule ``w(t)``; the solver then moves ``x <- step(x) - dx``.

**A guidance rule** is one function ``rule(d, x, n, t) -> Guidance`` registered in :data:`RULES`
(``@register_rule("name")``): given the denoiser ``d`` (networks, SDE, forward model, observation,
settings) and the state ``(x_t, n_t)`` at times ``t`` (one per row), it runs both networks and returns
their noise predictions, Tweedie's estimates, the residual and the gradients of its per-sample loss ``L``
with respect to ``x_t`` and ``n_t``. Adding a rule is that function and its registration, nothing else:
the config boundary validates ``sampler.rule`` against this registry. The shipped rules are built from
two Jacobians and two losses (``r = y - A(x0_hat, n0_hat)`` in [0, 1] units):

* ``dps`` (Chung et al., 2023): ``L = ||r||`` per sample (the step normalised by the residual norm),
  gradient through the networks (one vector-Jacobian product per prior per step);
* ``projection``: the ``dps`` loss with ``d x0_hat / d x_t`` taken as ``I / a_t``: no backward pass
  through the networks. Its weights do not carry over from the other rules;
* :func:`gaussian_nll` is the building block of a PiGDM-style rule: ``L = ||r||^2 / (2 Sigma_t)``,
  ``Sigma_t = sigma_y^2 + c_x^2 v_x(t) + c_n^2 v_n(t)`` per row, ``v(t) = Var[x_0 | x_t] =
  v_0 sigma_t^2 / (v_0 + sigma_t^2)``, ``sigma_t = s_t / a_t`` (in [0, 1] units: network variances / 4;
  ``v_0`` is ``sampler.data_var_x`` / ``data_var_n``). For Gaussian priors and the ``sde`` schedule that rule is
  the exact posterior SDE: ``tests/conftest.py`` registers it as ``exact-gaussian`` and
  ``tests/test_posterior.py`` checks it against the closed-form posterior. The product shipped it as
  ``tweedie`` until its quality benchmark (5-8 dB on the main scenario, below the observation itself) removed
  it; the ``paper`` preset is the authors' own form of that guidance.

Every quantity is per row: the loss of one sample never mixes with another's, so the gradient of the
summed loss is each sample's own gradient, and the forward model's parameters are (B,) tensors.

**Schedules** (:data:`SCHEDULES`, data: a name and a function of ``(sde, t, dt)``) multiply the weights by
``w(t)``: ``constant`` (1), ``sde`` (``beta(t) dt``), ``r2`` (``sigma_t^2 / (1 + sigma_t^2)``, as the
authors' code scales the step) or ``pigdm`` (``a_t``). An unknown name is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.diffusion.sampling import x0_from_eps
from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.forward import ForwardModel
from pipeline.settings import Registry

if TYPE_CHECKING:
    from pipeline.posterior.sampler import SamplerSettings

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Guidance:
    """One evaluation of both priors with data consistency (network units; per row)."""

    eps_x: torch.Tensor  # the image prior's noise prediction at (x_t, t)
    eps_n: torch.Tensor  # the noise prior's, at (n_t, t)
    x0: torch.Tensor  # Tweedie's estimates, unguided
    n0: torch.Tensor
    grad_x: torch.Tensor  # gradient of the per-sample loss with respect to x_t
    grad_n: torch.Tensor
    residual: torch.Tensor  # y - A(x0, n0), [0, 1] units
    dx: torch.Tensor | None = None  # the guidance moves lambda_x w(t) grad_x, set by GuidedDenoiser
    dn: torch.Tensor | None = None


@dataclass(frozen=True)
class Rule:
    fn: Callable[[GuidedDenoiser, torch.Tensor, torch.Tensor, torch.Tensor], Guidance]
    backward: bool  # whether it runs a backward pass through the networks (reported beside NFE)
    weights: tuple[float, float]  # (lambda_x, kappa_n) where no tuned weights exist (pipeline.posterior.tuned)


RULES: Registry[Rule] = Registry("guidance rule")


def register_rule(name: str, *, backward: bool = True, weights: tuple[float, float] = (1.0, 1.0),
                  ) -> Callable[[Callable[..., Guidance]], Callable[..., Guidance]]:
    """Register ``rule(d, x, n, t) -> Guidance`` under ``name``. ``backward``: whether it differentiates
    through the networks; ``weights``: its default ``(lambda_x, kappa_n)`` for combinations that have no
    tuned weights (documented here, printed with a note by :func:`pipeline.posterior.tuned.resolve_weights`)."""
    def add(fn: Callable[..., Guidance]) -> Callable[..., Guidance]:
        RULES.register(name, Rule(fn, backward, weights))
        return fn
    return add


# --- schedules ----------------------------------------------------------------------------------------

Schedule = Callable[[VPSDE, torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES: Registry[Schedule] = Registry("schedule")


def _sigma2(sde: VPSDE, t: torch.Tensor) -> torch.Tensor:
    """``sigma_t^2 = (s_t / a_t)^2``, the variance-exploding time of ``t``."""
    return (sde.sigma(t) / sde.alpha(t)) ** 2


@SCHEDULES.register("constant")
def _constant(sde: VPSDE, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(t)


@SCHEDULES.register("sde")
def _sde(sde: VPSDE, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return sde.beta(t) * dt


@SCHEDULES.register("r2")
def _r2(sde: VPSDE, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    sig2 = _sigma2(sde, t)
    return sig2 / (1 + sig2)


@SCHEDULES.register("pigdm")
def _pigdm(sde: VPSDE, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return sde.alpha(t)


# --- the denoiser -------------------------------------------------------------------------------------

def to01(z: torch.Tensor) -> torch.Tensor:
    """Network units ([-1, 1]) to storage units ([0, 1])."""
    return (z + 1.0) / 2.0


def posterior_var01(sde: VPSDE, t: torch.Tensor, v0: float) -> torch.Tensor:
    """Var[x_0 | x_t] for N(., v0) data, converted from network units to [0, 1] units."""
    sig2 = _sigma2(sde, t)
    return v0 * sig2 / (v0 + sig2) / 4.0


@dataclass(frozen=True)
class GuidedDenoiser:
    """Both priors and data consistency at ``(x_t, n_t, t)`` for the observation ``y`` ([0, 1] units)."""

    x_model: Net
    n_model: Net
    sde: VPSDE
    forward: ForwardModel
    y: torch.Tensor
    settings: SamplerSettings

    def __post_init__(self) -> None:
        if self.settings.lambda_x is None or self.settings.kappa_n is None:
            raise ValueError("the sampler's weights lambda_x / kappa_n are unset: give them, or take them from "
                             "the tuned table with pipeline.posterior.tuned.resolve_weights")
        if self.forward.batch_size != self.y.shape[0]:
            raise ValueError(f"the forward model has {self.forward.batch_size} rows but y has {self.y.shape[0]}")

    def residual(self, x0: torch.Tensor, n0: torch.Tensor) -> torch.Tensor:
        """``r = y - A(x0, n0)`` in [0, 1] units, for estimates in network units."""
        return self.y - self.forward.apply(to01(x0), to01(n0))

    def __call__(self, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> Guidance:
        """The rule's evaluation at times ``t`` (B,), with its guidance moves for a step of length ``dt``."""
        s = self.settings
        g = RULES[s.rule].fn(self, x, n, t)
        w = _bcast(SCHEDULES[s.schedule](self.sde, t, dt), x)
        g.dx = s.lambda_x * w * g.grad_x
        g.dn = s.kappa_n * w * g.grad_n
        return g


# --- building blocks of the rules ---------------------------------------------------------------------

Loss = Callable[[GuidedDenoiser, torch.Tensor, torch.Tensor], torch.Tensor]


def residual_norm(d: GuidedDenoiser, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||r||`` per sample (DPS)."""
    return torch.sqrt(r.pow(2).flatten(1).sum(1) + 1e-12)


def gaussian_nll(d: GuidedDenoiser, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||r||^2 / (2 Sigma_t)`` per sample, ``Sigma_t`` from the read-out noise and the priors' posterior
    variances propagated through the forward model's per-row coefficients."""
    f, s = d.forward, d.settings
    sigma2 = (f.sigma_y**2 + f.coef_x**2 * posterior_var01(d.sde, t, s.data_var_x)
              + f.coef_n**2 * posterior_var01(d.sde, t, s.data_var_n))
    return r.pow(2).flatten(1).sum(1) / (2 * sigma2)


def through_networks(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, loss: Loss) -> Guidance:
    """Both networks with ``loss``'s gradient taken through them: one vector-Jacobian product per prior."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        ng = n.detach().requires_grad_(True)
        ex, en = d.x_model(xg, t), d.n_model(ng, t)
        x0, n0 = x0_from_eps(d.sde, xg, ex, t), x0_from_eps(d.sde, ng, en, t)
        r = d.residual(x0, n0)
        # per-sample losses are independent, so the gradient of their sum is each one's gradient
        gx, gn = torch.autograd.grad(loss(d, r, t).sum(), [xg, ng])
    return Guidance(ex.detach(), en.detach(), x0.detach(), n0.detach(), gx, gn, r.detach())


def through_identity(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, loss: Loss) -> Guidance:
    """Both networks without a backward pass: ``d x0_hat / d x_t`` taken as ``I / a_t``."""
    with torch.no_grad():
        ex, en = d.x_model(x, t), d.n_model(n, t)
    with torch.enable_grad():
        x0 = x0_from_eps(d.sde, x, ex, t).requires_grad_(True)
        n0 = x0_from_eps(d.sde, n, en, t).requires_grad_(True)
        r = d.residual(x0, n0)
        g0x, g0n = torch.autograd.grad(loss(d, r, t).sum(), [x0, n0])
    a = _bcast(d.sde.alpha(t), x)
    return Guidance(ex, en, x0.detach(), n0.detach(), g0x / a, g0n / a, r.detach())


# --- the rules ----------------------------------------------------------------------------------------

@register_rule("dps", weights=(20.0, 20.0))
def dps(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> Guidance:
    return through_networks(d, x, n, t, residual_norm)


@register_rule("projection", backward=False, weights=(4.0, 4.0))
def projection(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> Guidance:
    return through_identity(d, x, n, t, residual_norm)

