"""Estimating each observation's mixing weight with its image and its noise (``forward.alpha: auto``).

A real dataset seldom knows how strongly its noise was mixed in: each scan's stamp is fainter or darker, each
watermark has its own opacity. :class:`WeightEstimator` wraps the guided denoiser of
:mod:`pipeline.posterior.guidance` so that the forward model's weight ``w`` (the blend's ``alpha``) of the rows
it is asked to estimate is re-estimated after every network evaluation, jointly with ``x`` and ``n``:

**An EM step on Tweedie's estimates.** Every shipped forward model is affine in its weight,
``A(x, n) = u(x, n) + w v(x, n)`` (:meth:`pipeline.forward.ForwardModel.weight_terms`; the blend:
``u = x``, ``v = n - x``). Given the current estimates ``x0_hat``, ``n0_hat`` (Tweedie's, from the evaluation
just made, in [0, 1]), the weight that best explains the observation is the least-squares one, per row:

    w_hat = <y - u, v> / <v, v>,     u, v at (x0_hat, n0_hat),

clipped to the model's range (:data:`BOUNDS`). It is the M-step of an EM iteration whose E-step is the sampler's
own estimate of ``(x, n)``. The estimate moves :data:`DAMPING` of the way to it at each evaluation,
``w <- w + DAMPING (w_hat - w)``: with the whole step it jumps from step to step, since the guidance has just
pulled ``(x, n)`` towards explaining ``y`` with the previous ``w``. The next evaluation's guidance uses it (the
solver's move towards the data is made with the model ``A(., .; w)``), and so does the final projection. Far from
``t = 0`` Tweedie's estimates are close to the priors' means and say little about ``w``: the weight is first
estimated at ``t <= start`` (:data:`START`) and held at its initial value (:data:`INITIAL`) before.
:data:`START` and :data:`DAMPING` were picked on faces + digits validation observations (docs/how-to/unknown-mixing.md).
The sums are taken a strip of rows at a time, so no whole-image copy of the estimates is made (an image of
4096x4096 stays within its memory).

**Identifiability.** For the blend both priors fix their images' amplitude (images in [0, 1] with the contrast
of their training data), so ``alpha`` is identifiable wherever the two estimates differ (``v != 0``). The
additive overlay's ``a`` and the composite's ``a`` multiply a noise whose own amplitude (a stripe's contrast, a
text's opacity) is free in the noise prior: ``a n`` and ``(a / k) (k n)`` explain ``y`` alike. They are not
estimated (``forward.alpha: auto`` is refused for them; :data:`ESTIMABLE`).

Each row's estimate uses its own observation and estimates only, so it does not depend on the rest of its batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.diffusion.sampling import x0_from_eps
from pipeline.posterior.guidance import Guidance, GuidedDenoiser, _strips, to01

ESTIMABLE = ("blend",)  # forward models whose weight the noise prior's amplitude does not confound
BOUNDS = (0.02, 0.98)  # the estimate's range (the blend's alpha lies in (0, 1))
INITIAL = 0.5  # the weight before the first estimate
START = 0.5  # the time from which the weight is estimated (Tweedie's estimates say little before)
DAMPING = 0.5  # each evaluation moves the estimate this fraction of the way to its least-squares weight


def least_squares_weight(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, eps_x: torch.Tensor,
                         eps_n: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per row, the weight ``<y - u, v> / <v, v>`` at Tweedie's estimates of ``(x_t, n_t)`` (unclipped; NaN where
    ``v`` is zero), summed a strip of rows at a time (:func:`pipeline.posterior.guidance._strips`)."""
    b, _, h, w = x.shape
    num = torch.zeros(b, dtype=torch.float64, device=x.device)
    den = torch.zeros_like(num)
    for rows in _strips(h, w, d.forward.pointwise):
        x0 = to01(x0_from_eps(d.sde, x[..., rows, :], eps_x[..., rows, :], t)).clamp_(0.0, 1.0)
        n0 = to01(x0_from_eps(d.sde, n[..., rows, :], eps_n[..., rows, :], t)).clamp_(0.0, 1.0)
        u, v = d.forward.weight_terms(x0, n0)
        num += ((d.y[..., rows, :] - u) * v).flatten(1).sum(1, dtype=torch.float64)
        den += v.pow(2).flatten(1).sum(1, dtype=torch.float64)
    return (num / den).to(x.dtype)


class WeightEstimator:
    """The guided denoiser ``d`` with the weight of the rows in ``mask`` (B,) re-estimated after each evaluation
    at ``t <= start``; the other rows keep theirs. Solvers call it as they call ``d``; :attr:`d` is the denoiser
    with the current estimate, :attr:`estimate` the (B,) weights in use (given ones where not estimated)."""

    def __init__(self, d: GuidedDenoiser, mask: torch.Tensor, start: float = START, damping: float = DAMPING,
                 bounds: tuple[float, float] = BOUNDS):
        name = d.forward.name
        if name not in ESTIMABLE:
            raise ValueError(f"the {name} model's weight cannot be estimated (the noise's own amplitude confounds "
                             f"it); give forward.alpha or an alpha column")
        self.weight = type(d.forward).weight
        assert self.weight is not None
        self.mask = mask.to(device=d.y.device, dtype=torch.bool)
        self.start, self.damping, self.bounds = start, damping, bounds
        self.d = d

    @property
    def estimate(self) -> torch.Tensor:
        return getattr(self.d.forward, self.weight)

    def __getattr__(self, name: str) -> Any:  # sde, settings, y, forward... of the current denoiser
        return getattr(self.__dict__["d"], name)

    def __call__(self, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> Guidance:
        g = self.d(x, n, t, dt)
        if float(t.reshape(-1)[0]) <= self.start and bool(self.mask.any()):
            w = least_squares_weight(self.d, x, n, g.eps_x, g.eps_n, t)
            cur = self.estimate.to(w.device)
            step = cur + self.damping * (w.clamp(*self.bounds) - cur)
            new = torch.where(self.mask & torch.isfinite(w), step, cur)
            self.d = dataclasses.replace(self.d, forward=self.d.forward.with_params(**{self.weight: new}))
        return g


def initial_weights(given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The weights a sampler starts from: the given ones, :data:`INITIAL` where ``mask`` asks for an estimate."""
    return torch.where(mask.to(torch.bool), torch.full_like(given, INITIAL), given)
