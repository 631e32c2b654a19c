"""Joint posterior sampling of an image ``x`` and structured noise ``n`` from ``y = A(x, n)``, in plain torch.

Stevens et al., "Removing Structured Noise using Diffusion Models" (TMLR 2025), with the guidance of
DPS (Chung et al., 2023) and PiGDM (Song et al., 2023). Per step, from ``t`` to ``t - dt``:

1. both priors predict noise at once: ``e_x = e_theta(x_t, t)``, ``e_n = e_phi(n_t, t)``; Tweedie gives
   ``x0_hat = (x_t - s_t e_x) / a_t`` and ``n0_hat`` likewise;
2. residual ``r = y - A(x0_hat, n0_hat)`` (storage units, [0, 1] images) and a per-sample loss ``L``;
3. a reverse step of each variable under its own prior (the solver);
4. data consistency: ``x <- x - lambda_x w(t) grad_{x_t} L``, ``n <- n - kappa_n w(t) grad_{n_t} L``.

Steps 1, 2 and the gradients of 4 are the guided joint denoiser and its guidance rule
(:mod:`pipeline.posterior.guidance`: :class:`~pipeline.posterior.guidance.GuidedDenoiser`, :data:`RULES`,
:data:`SCHEDULES`). This module holds what is left, shaped like k-diffusion's ``sampling.py``:

* **one function per solver** over the guided denoiser, in the registry :data:`SOLVERS`
  (``@SOLVERS.register("name")``): :func:`sample_euler_maruyama` (the paper's sampler) and
  :func:`sample_ddim` (DDIM with stochasticity ``eta``; with ``clip_denoised`` its Tweedie estimates are
  clipped to the data range in each step). A solver integrates from ``ts[0] = 1`` to ``ts[-1] = eps``;
  a preset adds its own by registering a function of the same signature;
* **the last step in one place** (:func:`solve`): the networks are evaluated at ``steps`` times from 1
  down to ``eps``; the last evaluation's *guided* Tweedie estimate is the result, so NFE = ``steps`` per
  prior; :func:`joint_sample` then moves ``(x, n)`` the least distance that explains ``y``
  (``final_projection``, :func:`project`);
* **the settings, declared once**: :class:`SamplerSettings`, a plain frozen dataclass (the config file's
  ``SamplerConfig`` is built from it in :mod:`pipeline.config`). ``lambda_x`` / ``kappa_n`` left None are
  taken from the tuned table (:func:`pipeline.posterior.tuned.resolve_weights`) by whoever builds the
  settings; the sampler itself refuses to run without weights.

DDIM at 50 steps is the default: on the quality benchmark it matches the paper's 600 Euler-Maruyama steps
(docs/bench/speed.md). Every quantity is per sample, the forward model's parameters are per row, and each
sample's noise comes from its own generator, seeded from its image id, so a result never depends on the
rest of its batch. This module imports only torch: ``pipeline/bench/gpu.py`` runs it on a bare GPU machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import metrics
from pipeline.diffusion.sampling import x0_from_eps
from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.forward import ForwardModel
from pipeline.posterior.guidance import RULES, SCHEDULES, GuidedDenoiser, Net, to01
from pipeline.settings import Registry, check_fields

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Solver = Callable[..., tuple[torch.Tensor, torch.Tensor]]
SOLVERS: Registry[Solver] = Registry("solver")
PRESETS: Registry[dict[str, Any]] = Registry("sampler preset")
"""Named sets of settings (``--set sampler.preset=NAME``; keys given beside it win), e.g. ``paper``."""


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample the joint posterior. ``nfe = steps`` per prior per posterior sample."""

    rule: str = field(default="dps", metadata={"check": RULES.check, "description": "guidance rule (registered in "
                                                                                    "pipeline.posterior.guidance)"})
    steps: int = field(default=50, metadata={"ge": 2, "description": "network evaluations per prior, from t = 1 "
                                                                    "down to t = eps"})
    lambda_x: float | None = field(default=None, metadata={
        "ge": 0, "description": "data-consistency weight on the image; default: the tuned table "
                                "(pipeline/posterior/tuned.yaml), else the rule's default weight"})
    kappa_n: float | None = field(default=None, metadata={
        "ge": 0, "description": "data-consistency weight on the noise; default as lambda_x"})
    schedule: str = field(default="constant", metadata={"check": SCHEDULES.check,
                                                        "description": "constant, sde, r2 or pigdm"})
    solver: str = field(default="ddim", metadata={"check": SOLVERS.check,
                                                  "description": "ddim or euler-maruyama"})
    eta: float = field(default=1.0, metadata={"ge": 0, "le": 1, "description": "ddim only: 0 deterministic, "
                                                                             "1 ancestral (DDPM-like)"})
    clip_denoised: bool = field(default=True, metadata={
        "description": "ddim only: clip Tweedie's estimates to [-1, 1] in each step (a few trajectories run away "
                       "at 50 steps without it)"})
    data_var_x: float = field(default=1.0, metadata={"gt": 0, "description": "prior variance of x_0 (network "
                                                                           "units) for Sigma_t"})
    data_var_n: float = field(default=1.0, metadata={"gt": 0, "description": "prior variance of n_0 (network "
                                                                           "units) for Sigma_t"})
    time_power: float = field(default=1.0, metadata={"ge": 1, "description": "1: evenly spaced times; > 1: "
                                                                            "denser near t = 0"})
    final_projection: bool = field(default=True, metadata={"description": "end with the least-distance move onto "
                                                                          "y = A(x, n)"})
    n_samples: int = field(default=1, metadata={"ge": 1, "description": "posterior samples per image (mean and "
                                                                       "spread)"})
    tile_overlap: int = field(default=8, metadata={"ge": 0, "description": "images larger than the priors: "
                                                                          "pixels shared by neighbouring tiles"})
    path: str = field(default="joint", metadata={
        "check": lambda v: _one_of("path", v, PATHS),
        "description": "joint: the joint sampler on every image; fast: the supervised network (priors.supervised) "
                       "alone, one evaluation per image (plus the noise prior's pick of an unknown weight); "
                       "routed: the network on every image, the joint sampler on those whose answer the priors "
                       "find unusual (docs/how-to/supervised.md)"})
    route_quantile: float = field(default=0.9, metadata={
        "gt": 0, "lt": 1, "description": "routed: an image goes to the joint sampler when its score is above this "
                                         "quantile of the network's validation scores (0.5, 0.8, 0.9, 0.95, 0.99)"})
    seed: int = field(default=0, metadata={"description": "seed of the sampler's noise, combined with each image's id"})

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def nfe(self) -> int:
        return self.steps


PATHS = ("joint", "fast", "routed")


def _one_of(name: str, v: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValueError(f"unknown {name} {v!r}; choose one of {', '.join(choices)}")
    return v


class Noise:
    """Standard normal draws: one generator per sample (batch-independent) or one for the batch."""

    def __init__(self, seeds: Sequence[int] | None, generator: torch.Generator | None, device: torch.device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if seeds is not None else None
        self.generator = generator
        self.device = device

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(shape)
        if self.gens is None:
            return torch.randn(shape, generator=self.generator).to(self.device)
        out = torch.empty(shape)  # filled row by row: a 4096x4096 image's draw is not held twice
        for row, g in zip(out, self.gens):
            torch.randn(shape[1:], generator=g, out=row)
        return out.to(self.device)


def seed_for(image_id: str, base_seed: int = 0, sample: int = 0) -> int:
    """A 63-bit seed from an image id: the same id always draws the same noise."""
    digest = hashlib.blake2b(f"{base_seed}/{sample}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# --- solvers: from ts[0] to ts[-1], one guided evaluation per step ---------------------------------------

@SOLVERS.register("euler-maruyama")
def sample_euler_maruyama(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, ts: torch.Tensor, noise: Noise,
                          callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse Euler-Maruyama steps under each prior's score ``-e / s_t``, then the guidance moves."""
    sde = d.sde
    for i in range(len(ts) - 1):
        t, dt = ts[i].expand(x.shape[0]), ts[i] - ts[i + 1]
        g = d(x, n, t, dt)
        s = _bcast(sde.sigma(t), x)
        x = sde.reverse_step(x, t, dt, -g.eps_x / s, noise.randn(x.shape)).sub_(g.dx)
        n = sde.reverse_step(n, t, dt, -g.eps_n / s, noise.randn(n.shape)).sub_(g.dn)
        del g  # before the next evaluation makes its own
        if callback is not None:
            callback(i, x, n)
    return x, n


def ddim_step(sde: VPSDE, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eta: float,
              noise: Noise, clip: bool = False) -> torch.Tensor:
    """DDIM (Song et al., 2021) from ``t`` to ``t_next`` (one per row) with stochasticity ``eta``.

    ``clip``: Tweedie's estimate ``x0`` is clipped to the data range [-1, 1] and the noise estimate
    recomputed to match (``e = (x - a x0) / s``), as DDPM's ``clip_denoised``: an estimate that the
    guidance has pushed out of range cannot carry the trajectory further away."""
    a, s = _bcast(sde.alpha(t), x), _bcast(sde.sigma(t), x)
    a2, s2 = _bcast(sde.alpha(t_next), x), _bcast(sde.sigma(t_next), x)
    c = eta * torch.sqrt((s2 / s) ** 2 * (1 - (a / a2) ** 2)).clamp_min(0) if eta > 0 else torch.zeros_like(s)
    k = torch.sqrt((s2**2 - c**2).clamp_min(0))
    x0 = x0_from_eps(sde, x, eps, t)
    if clip:  # eps = (x - a x0) / s after the clip, so a2 x0 + k eps = (a2 - k a / s) x0 + (k / s) x
        out = x0.clamp_(-1.0, 1.0).mul_(a2 - k * a / s).addcmul_(x, k / s)
    else:
        out = x0.mul_(a2).addcmul_(eps, k)
    # in place throughout: the one new image-size tensor is the result (and the draw, with eta > 0)
    return out.add_(noise.randn(x.shape).mul_(c)) if eta > 0 else out


@SOLVERS.register("ddim")
def sample_ddim(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, ts: torch.Tensor, noise: Noise,
                callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM steps (``settings.eta``, ``settings.clip_denoised``), then the guidance moves."""
    eta, clip = d.settings.eta, d.settings.clip_denoised
    for i in range(len(ts) - 1):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        g = d(x, n, t, ts[i] - ts[i + 1])
        x = ddim_step(d.sde, x, g.eps_x, t, t_next, eta, noise, clip).sub_(g.dx)
        eps_n, dn = g.eps_n, g.dn
        del g  # what x's step used goes before n's step, and before the next evaluation makes its own
        n = ddim_step(d.sde, n, eps_n, t, t_next, eta, noise, clip).sub_(dn)
        del eps_n, dn
        if callback is not None:
            callback(i, x, n)
    return x, n


# --- the sampler --------------------------------------------------------------------------------------

@torch.no_grad()
def solve(d: GuidedDenoiser, noise: Noise, callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``settings.steps`` guided evaluations from ``x, n ~ N(0, I)``: the solver's ``steps - 1`` steps from
    ``t = 1`` to ``t = eps``, then the last evaluation, whose guided Tweedie estimates ``(x0, n0)`` (network
    units) are the result."""
    s = d.settings
    shape = tuple(d.y.shape)
    x = noise.randn(shape)
    n = noise.randn((shape[0], d.forward.noise_channels(shape[1]), *shape[2:]))
    ts = d.sde.timesteps(s.steps - 1, device=d.y.device, power=s.time_power)
    solver = SOLVERS[s.solver]
    if getattr(solver, "finishes", False):  # a solver that ends on its own result (the paper preset's)
        return solver(d, x, n, ts, noise, callback)
    x, n = solver(d, x, n, ts, noise, callback)
    # the last evaluation, at t = eps; its guidance weight uses the length of the step before it
    t = ts[-1].expand(shape[0])
    dt = ts[-2] - ts[-1] if len(ts) > 1 else ts[-1] - d.sde.eps
    g = d(x, n, t, dt)
    x = x0_from_eps(d.sde, x, g.eps_x, t, move=g.dx)
    eps_n, dn = g.eps_n, g.dn
    del g  # as in the solvers' steps: what x used goes before n's estimate
    n = x0_from_eps(d.sde, n, eps_n, t, move=dn)
    del eps_n, dn
    if callback is not None:
        callback(len(ts) - 1, x, n)
    return x, n


def project(forward: ForwardModel, y: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move ``(x, n)`` the least distance that explains the residual of ``y``
    (:meth:`pipeline.forward.ForwardModel.project`)."""
    return forward.project(y, x, n)


@dataclass
class JointResult:
    """Posterior draws in [0, 1] units (``x`` clean image, ``n`` noise), shape (B, C, H, W); the noise has
    the forward model's channels (:meth:`~pipeline.forward.ForwardModel.noise_channels`)."""

    x: torch.Tensor
    n: torch.Tensor
    residual: torch.Tensor  # per sample RMS of y - A(x, n) at the end, before the final projection
    nfe: int
    backward: bool
    weight: torch.Tensor | None = None  # (B,) the forward model's weight at the end: estimated rows' estimates


@torch.no_grad()
def joint_sample(x_model: Net, n_model: Net, sde: VPSDE, y: torch.Tensor, forward: ForwardModel,
                 settings: SamplerSettings, seeds: Sequence[int] | None = None,
                 generator: torch.Generator | None = None, callback: Callback | None = None,
                 runtime: Any = None, tile: int | None = None, tile_batch: int = 64,
                 estimate: torch.Tensor | None = None) -> JointResult:
    """Draw one joint posterior sample ``(x, n)`` per observation in ``y`` ([0, 1] units, (B, C, H, W)), with
    ``forward`` holding one row of parameters per observation.

    ``seeds`` (one per row; see :func:`seed_for`) make each row's result independent of its batch;
    without them, one ``generator`` serves the whole batch (faster; for tests and benchmarks).
    ``runtime`` (:class:`~pipeline.posterior.core.Runtime`) sets how the networks run: bf16 autocast,
    channels-last, ``torch.compile``; None (float32, as given) changes nothing.
    ``tile``: the priors' trained size (default: the image prior's ``config.image_size`` where it has one);
    an image of another size is evaluated in overlapping tiles of it, at most ``tile_batch`` per network
    call (:mod:`pipeline.diffusion.tiles`); None: the networks see the whole image.
    ``estimate``: (B,) bool, the rows whose forward weight (the blend's ``alpha``) is estimated with ``x`` and
    ``n`` (:mod:`pipeline.posterior.estimate`; their given weight is ignored); the result's ``weight`` holds it.
    """
    if tile is None:
        tile = getattr(getattr(x_model, "config", None), "image_size", None)
    if tile is not None and tuple(y.shape[-2:]) != (tile, tile) and getattr(SOLVERS[settings.solver], "finishes",
                                                                             False):
        raise ValueError(f"the {settings.solver} solver runs at the priors' size ({tile}x{tile}) only; "
                         f"the images are {y.shape[-2]}x{y.shape[-1]}: use sampler.solver=ddim")
    if runtime is not None:
        x_model, n_model = runtime.wrap(x_model, y.device), runtime.wrap(n_model, y.device)
    forward = forward.to(y.device)
    weight = type(forward).weight
    if estimate is not None and bool(estimate.any()):
        from pipeline.posterior.estimate import WeightEstimator, initial_weights

        mask = estimate.to(y.device, torch.bool)
        forward = forward.with_params(**{weight: initial_weights(getattr(forward, weight), mask)})  # type: ignore[arg-type]
        est = WeightEstimator(GuidedDenoiser(x_model, n_model, sde, forward, y, settings, tile, tile_batch), mask)
        x, n = solve(est, Noise(seeds, generator, y.device), callback)  # type: ignore[arg-type]
        forward = est.d.forward
    else:
        d = GuidedDenoiser(x_model, n_model, sde, forward, y, settings, tile, tile_batch)
        x, n = solve(d, Noise(seeds, generator, y.device), callback)
    x0, n0 = to01(x), to01(n)
    # the residual is measured before the projection: how far the priors' estimate is from explaining y
    residual = metrics.residual(y, forward.apply(x0, n0))
    if settings.final_projection:
        x0, n0 = project(forward, y, x0, n0)
    return JointResult(x0, n0, residual, settings.nfe, RULES[settings.rule].backward,
                       getattr(forward, weight) if weight is not None else None)
