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

The loop itself, the guidance and the GPU settings (:class:`~pipeline.posterior.core.Runtime`: bf16
autocast, channels-last, ``torch.compile``) are plain torch in :mod:`pipeline.posterior.core`, shared
with ``pipeline/bench/gpu.py``; this module adds the validated config, the seeds and the result.

The step of item 3 is DDIM by default (``solver="ddim"``, stochasticity ``eta``; with ``clip_denoised``
its Tweedie estimates are clipped to the data range in each step), at 50 steps: on the quality benchmark
that matches the paper's 600 Euler-Maruyama steps (``solver="euler-maruyama"``; README "Speed").
The sampler evaluates the networks at ``steps`` times from 1 down to ``eps``; the last evaluation's
guided Tweedie estimate is the result, so NFE = ``steps`` per prior. ``final_projection`` then moves
``(x, n)`` the least distance that explains ``y`` (:func:`project`).

The ``paper`` preset (``rule="paper"``, ``solver="paper"``, 600 steps: :data:`pipeline.posterior.paper.PRESET`)
runs the authors' own step instead, translated to the VP SDE: the residual at the Euler-Maruyama
predictor's mean and ``J^T 1`` in place of the vector-Jacobian product (:mod:`pipeline.posterior.paper`).

Every quantity is per sample and each sample's noise comes from its own generator, seeded from
its image id, so a result never depends on the rest of its batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pipeline import metrics
from pipeline.diffusion.sde import VPSDE
from pipeline.posterior.core import (  # noqa: F401  (re-exported: the loop's pieces, in plain torch)
    RULES,
    GuidanceRule,
    Noise,
    Runtime,
    _posterior_var01,
    _to01,
    guidance,
    project,
    run_steps,
)
from pipeline.posterior.forward import ForwardModel
from pipeline.posterior.paper import sample_paper


class SamplerConfig(BaseModel):
    """How to sample the joint posterior. ``nfe = steps`` per prior per posterior sample."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["tweedie", "dps", "projection", "paper"] = "dps"
    steps: int = Field(50, ge=2, description="network evaluations per prior, from t = 1 down to t = eps")
    # defaults: DDIM at 50 steps with the weights `jointdiff bench nfe` tuned for it on the validation split
    # (configs/guidance.yaml, solvers.ddim.50); it matches 600 Euler-Maruyama steps on the test split
    lambda_x: float = Field(20.0, ge=0, description="data-consistency weight on the image")
    kappa_n: float = Field(20.0, ge=0, description="data-consistency weight on the noise")
    schedule: Literal["constant", "sde", "r2", "pigdm"] = "constant"
    solver: Literal["euler-maruyama", "ddim", "paper"] = "ddim"
    eta: float = Field(1.0, ge=0, le=1, description="ddim only: 0 deterministic, 1 ancestral (DDPM-like)")
    clip_denoised: bool = Field(True, description="ddim only: clip Tweedie's estimates to [-1, 1] in each step "
                                                  "(a few trajectories run away at 50 steps without it)")
    data_var_x: float = Field(1.0, gt=0, description="prior variance of x_0 (network units) for Sigma_t")
    data_var_n: float = Field(1.0, gt=0, description="prior variance of n_0 (network units) for Sigma_t")
    time_power: float = Field(1.0, ge=1, description="1: evenly spaced times; > 1: denser near t = 0")
    final_projection: bool = Field(True, description="end with the least-distance move onto y = A(x, n)")
    n_samples: int = Field(1, ge=1, description="posterior samples per image (mean and spread)")
    seed: int = 0

    @model_validator(mode="after")
    def _paper_goes_together(self) -> SamplerConfig:
        if (self.rule == "paper") != (self.solver == "paper"):
            raise ValueError("rule 'paper' and solver 'paper' go together (the authors' step is both): "
                             "set sampler.rule=paper and sampler.solver=paper, or neither")
        return self

    @property
    def nfe(self) -> int:
        return self.steps

    def identity(self) -> dict[str, Any]:
        """The settings that decide the results (for run ids). ``clip_denoised`` (added after ``eta``) only
        with DDIM, so an Euler-Maruyama run keeps the id it had before that setting existed."""
        d = self.model_dump()
        if self.solver != "ddim":
            d.pop("clip_denoised")
        return d


def seed_for(image_id: str, base_seed: int = 0, sample: int = 0) -> int:
    """A 63-bit seed from an image id: the same id always draws the same noise."""
    digest = hashlib.blake2b(f"{base_seed}/{sample}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class JointResult:
    """Posterior draws in [0, 1] units (``x`` clean image, ``n`` noise), shape (B, C, H, W)."""

    x: torch.Tensor
    n: torch.Tensor
    residual: torch.Tensor  # per sample RMS of y - A(x, n) at the end, before the final projection
    nfe: int
    backward: bool


@torch.no_grad()
def joint_sample(x_model: nn.Module, n_model: nn.Module, sde: VPSDE, y: torch.Tensor, forward: ForwardModel,
                 cfg: SamplerConfig, seeds: Sequence[int] | None = None,
                 generator: torch.Generator | None = None,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 runtime: Runtime | None = None) -> JointResult:
    """Draw one joint posterior sample ``(x, n)`` per observation in ``y`` ([0, 1] units, (B, C, H, W)).

    ``seeds`` (one per row; see :func:`seed_for`) make each row's result independent of its batch;
    without them, one ``generator`` serves the whole batch (faster; for tests and benchmarks).
    ``runtime`` (:class:`~pipeline.posterior.core.Runtime`) sets how the networks run: bf16 autocast,
    channels-last, ``torch.compile``; the default (float32, as given) changes nothing.
    """
    noise = Noise(seeds, generator, y.device)
    xm: Any = x_model
    nm: Any = n_model
    if runtime is not None:
        xm, nm = runtime.wrap(x_model, y.device), runtime.wrap(n_model, y.device)
    if cfg.solver == "paper":
        x, n = sample_paper(xm, nm, sde, y, forward, cfg.steps, cfg.lambda_x, cfg.kappa_n, noise, callback)
    else:
        # `guidance` is looked up here at each call, so a test can replace it in this module
        x, n = run_steps(xm, nm, sde, y, forward, cfg, noise, guide=lambda *a: guidance(*a), callback=callback)
    x0, n0 = _to01(x), _to01(n)
    # the residual is measured before the projection: how far the priors' estimate is from explaining y
    residual = metrics.residual(y, forward.apply(x0, n0))
    if cfg.final_projection:
        x0, n0 = project(forward, y, x0, n0)
    return JointResult(x0, n0, residual, cfg.nfe, cfg.rule == "paper" or RULES[cfg.rule].backward)
