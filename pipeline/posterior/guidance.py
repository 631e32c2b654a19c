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

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.diffusion.sampling import x0_from_eps
from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.diffusion.tiles import Tiling, blended, tiled, tiled_vjp
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
    grad_x: torch.Tensor  # gradient of the per-sample loss with respect to x_t
    grad_n: torch.Tensor
    residual: torch.Tensor  # y - A(x0_hat, n0_hat) for Tweedie's unguided estimates, [0, 1] units
    # the guidance moves lambda_x w(t) grad_x and kappa_n w(t) grad_n, set by GuidedDenoiser: scaled in place,
    # so that after the call grad_x / grad_n are the moves too (an image of 4096x4096 holds no extra copies)
    dx: torch.Tensor | None = None
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
    tile: int | None = None  # the priors' trained size: larger (or smaller) images are evaluated in tiles
    tile_batch: int = 64  # tiles per network call (memory), never the result

    def __post_init__(self) -> None:
        if self.settings.lambda_x is None or self.settings.kappa_n is None:
            raise ValueError("the sampler's weights lambda_x / kappa_n are unset: give them, or take them from "
                             "the tuned table with pipeline.posterior.tuned.resolve_weights")
        if self.forward.batch_size != self.y.shape[0]:
            raise ValueError(f"the forward model has {self.forward.batch_size} rows but y has {self.y.shape[0]}")

    def tiling(self, t: torch.Tensor) -> Tiling | None:
        """The tiles for the step at times ``t``, None when the networks see the whole image. The offset is
        drawn from the sampler's seed and the step's time, so it moves at every step, is the same for every
        image of the batch and for both priors, and does not depend on batching."""
        if self.tile is None:
            return None
        h, w = self.y.shape[-2:]
        overlap = min(self.settings.tile_overlap, self.tile - 1)
        if h == w == self.tile:
            return Tiling(h, w, self.tile, overlap)
        digest = hashlib.blake2b(f"{self.settings.seed}/{float(t.reshape(-1)[0]):.9e}".encode(), digest_size=8)
        v = int.from_bytes(digest.digest(), "little")
        stride = self.tile - overlap
        return Tiling(h, w, self.tile, overlap, (v % stride, (v // stride) % stride))

    def predict(self, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
                tiling: Tiling | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both networks' noise predictions at ``(x_t, n_t, t)``, whole or tiled; no graph."""
        if tiling is None:
            with torch.no_grad():
                return self.x_model(x, t), self.n_model(n, t)
        return (tiled(self.x_model, x, t, tiling, self.tile_batch),
                tiled(self.n_model, n, t, tiling, self.tile_batch))

    @property
    def pixel_scale(self) -> float:
        """``sqrt(P / P0)``: the image's values over the priors' (1 when untiled), so that a loss normalised by
        ``||r||`` moves each pixel as far at every image size (:func:`residual_norm`)."""
        if self.tile is None:
            return 1.0
        return float(self.y.shape[-2] * self.y.shape[-1] / self.tile**2) ** 0.5

    def residual(self, x0: torch.Tensor, n0: torch.Tensor) -> torch.Tensor:
        """``r = y - A(x0, n0)`` in [0, 1] units, for estimates in network units."""
        return self.y - self.forward.apply(to01(x0), to01(n0))

    def __call__(self, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> Guidance:
        """The rule's evaluation at times ``t`` (B,), with its guidance moves for a step of length ``dt``."""
        s = self.settings
        g = RULES[s.rule].fn(self, x, n, t)
        w = _bcast(SCHEDULES[s.schedule](self.sde, t, dt), x)
        g.dx = g.grad_x.mul_(s.lambda_x * w)
        g.dn = g.grad_n.mul_(s.kappa_n * w)
        return g


# --- building blocks of the rules ---------------------------------------------------------------------

Loss = Callable[[GuidedDenoiser, torch.Tensor, torch.Tensor], torch.Tensor]


def residual_norm(d: GuidedDenoiser, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||r|| sqrt(P / P0)`` per sample (DPS), for images of ``P`` values and priors of ``P0``: the step
    ``r / (rms(r) sqrt(P0))`` is normalised by the per-pixel RMS residual, so a weight means the same at
    every image size; at the priors' own size it is DPS's ``||r||``."""
    return torch.sqrt(r.pow(2).flatten(1).sum(1) + 1e-12) * d.pixel_scale


def gaussian_nll(d: GuidedDenoiser, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||r||^2 / (2 Sigma_t)`` per sample, ``Sigma_t`` from the read-out noise and the priors' posterior
    variances propagated through the forward model's per-row coefficients."""
    f, s = d.forward, d.settings
    sigma2 = (f.sigma_y**2 + f.coef_x**2 * posterior_var01(d.sde, t, s.data_var_x)
              + f.coef_n**2 * posterior_var01(d.sde, t, s.data_var_n))
    return r.pow(2).flatten(1).sum(1) / (2 * sigma2)


def through_networks(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, loss: Loss) -> Guidance:
    """Both networks with ``loss``'s gradient taken through them: one vector-Jacobian product per prior.

    Tiled (an image that is not the priors' size): the residual is the whole image's. When the batch's tiles fit
    in one tile batch they run in one call with its graph (:func:`pipeline.diffusion.tiles.blended`); otherwise
    the networks first run without a graph over all tiles, and the loss's gradient with respect to their blended
    outputs then goes back through them one tile batch at a time (:func:`pipeline.diffusion.tiles.tiled_vjp`)."""
    tiling = d.tiling(t)
    if tiling is not None and not tiling.single and len(tiling.origins) * x.shape[0] > d.tile_batch:
        # x0 = (x_t - s e(x_t)) / a, so dL/dx_t = (g0 - s J^T g0) / a for g0 = dL/dx0: one cotangent per prior,
        # applied in place (the full-size tensors alive are what a 4096x4096 image's memory is made of)
        ex, en = d.predict(x, n, t, tiling)
        r, g0x, g0n = _loss_grads(d, x, n, ex, en, t, loss)
        a, s = _bcast(d.sde.alpha(t), x), _bcast(d.sde.sigma(t), x)
        gx = tiled_vjp(d.x_model, x, t, tiling, d.tile_batch, g0x).mul_(-s).add_(g0x).div_(a)
        del g0x
        gn = tiled_vjp(d.n_model, n, t, tiling, d.tile_batch, g0n).mul_(-s).add_(g0n).div_(a)
        del g0n
        return Guidance(ex, en, gx, gn, r.detach())
    # whole, or tiles that fit in one tile batch: one pass with its graph
    x_net, n_net = d.x_model, d.n_model
    if tiling is not None and not tiling.single:
        x_net = functools.partial(blended, d.x_model, tiling=tiling)  # type: ignore[assignment]
        n_net = functools.partial(blended, d.n_model, tiling=tiling)  # type: ignore[assignment]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        ng = n.detach().requires_grad_(True)
        ex, en = x_net(xg, t), n_net(ng, t)
        x0, n0 = x0_from_eps(d.sde, xg, ex, t), x0_from_eps(d.sde, ng, en, t)
        r = d.residual(x0, n0)
        # per-sample losses are independent, so the gradient of their sum is each one's gradient
        gx, gn = torch.autograd.grad(loss(d, r, t).sum(), [xg, ng])
    return Guidance(ex.detach(), en.detach(), gx, gn, r.detach())


STRIP_PIXELS = 1 << 20  # pixels per strip of :func:`_loss_grads`


def _strips(h: int, w: int, pointwise: bool) -> list[slice]:
    """Row ranges of about :data:`STRIP_PIXELS` pixels each (the whole image where the forward model is not
    pointwise)."""
    rows = max(1, STRIP_PIXELS // max(w, 1)) if pointwise else h
    return [slice(i, min(i + rows, h)) for i in range(0, h, rows)]


def _loss_grads(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, ex: torch.Tensor, en: torch.Tensor,
                t: torch.Tensor, loss: Loss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual ``r`` of Tweedie's estimates and the loss's gradients ``dL/dx0``, ``dL/dn0``, computed a strip
    of rows at a time where the forward model is pointwise: the estimates and the forward model's graph then
    never exist at the image's full size. The loss sees the whole residual (``dL/dr`` first, then the forward
    model's vector-Jacobian product strip by strip)."""
    strips = _strips(x.shape[-2], x.shape[-1], d.forward.pointwise)

    def estimates(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return (x0_from_eps(d.sde, x[..., rows, :], ex[..., rows, :], t),
                x0_from_eps(d.sde, n[..., rows, :], en[..., rows, :], t))

    r = torch.empty_like(d.y)
    with torch.no_grad():
        for rows in strips:
            x0, n0 = estimates(rows)
            r[..., rows, :] = d.y[..., rows, :] - d.forward.apply(to01(x0), to01(n0))
    with torch.enable_grad():
        rg = r.requires_grad_(True)
        gr = torch.autograd.grad(loss(d, rg, t).sum(), rg)[0]
    r = r.detach()
    g0x, g0n = torch.empty_like(x), torch.empty_like(n)
    for rows in strips:
        with torch.enable_grad():
            x0, n0 = (e.requires_grad_(True) for e in estimates(rows))
            fit = d.forward.apply(to01(x0), to01(n0))
            g0x[..., rows, :], g0n[..., rows, :] = torch.autograd.grad(fit, [x0, n0], grad_outputs=-gr[..., rows, :])
    return r, g0x, g0n


def through_identity(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, loss: Loss) -> Guidance:
    """Both networks without a backward pass: ``d x0_hat / d x_t`` taken as ``I / a_t``."""
    ex, en = d.predict(x, n, t, d.tiling(t))
    with torch.enable_grad():
        x0 = x0_from_eps(d.sde, x, ex, t).requires_grad_(True)
        n0 = x0_from_eps(d.sde, n, en, t).requires_grad_(True)
        r = d.residual(x0, n0)
        g0x, g0n = torch.autograd.grad(loss(d, r, t).sum(), [x0, n0])
    a = _bcast(d.sde.alpha(t), x)
    return Guidance(ex, en, g0x / a, g0n / a, r.detach())


# --- the rules ----------------------------------------------------------------------------------------

@register_rule("dps", weights=(20.0, 20.0))
def dps(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> Guidance:
    return through_networks(d, x, n, t, residual_norm)


@register_rule("projection", backward=False, weights=(4.0, 4.0))
def projection(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> Guidance:
    return through_identity(d, x, n, t, residual_norm)

