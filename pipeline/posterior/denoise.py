"""Clean a batch of observations: ``K`` joint posterior samples per image, their mean and spread.

This is the unit of work a Ray actor will run (one batch in, one batch out); it knows nothing of
storage. ``denoised`` is the posterior mean of ``x`` over the ``K`` samples, ``noise_estimate`` that
of ``n``, ``uncertainty`` the per-pixel standard deviation of ``x`` (only when ``K > 1``), ``residual``
the RMS by which the priors' estimates missed ``y`` before the final projection (mean over samples).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline import metrics
from pipeline.diffusion.sde import VPSDE
from pipeline.forward import ForwardModel
from pipeline.posterior.core import Runtime
from pipeline.posterior.sampler import SamplerSettings, joint_sample, seed_for


@dataclass
class DenoiseOutput:
    denoised: torch.Tensor  # (B, C, H, W) in [0, 1]
    noise_estimate: torch.Tensor
    uncertainty: torch.Tensor | None
    residual: torch.Tensor  # (B,)
    spread: torch.Tensor
    removed_energy: torch.Tensor
    nfe: int  # network evaluations per prior per image: steps x posterior samples
    backward: bool
    seconds: float  # wall time of the batch / B
    alpha_hat: torch.Tensor | None = None  # (B,) the forward weight each image was cleaned with (estimated: mean
    # over its posterior samples); None for a model without a weight
    path: list[str] | None = None  # per image, what cleaned it (sampler.path fast / routed: "fast" or "joint")
    route_score: torch.Tensor | None = None  # (B,) the router's score (NaN where none was computed)
    nfe_per_image: list[int] | None = None  # network evaluations per image where they differ (routed)


@dataclass
class Denoiser:
    """The sampler with its networks and settings; called with a batch and its forward model (one row of
    parameters per image, so a batch may mix alphas)."""

    x_model: nn.Module
    n_model: nn.Module
    sde: VPSDE
    settings: SamplerSettings
    runtime: Runtime | None = None  # bf16 / channels-last / compile (pipeline.posterior.core); None: as given
    tile_batch: int = 64  # images larger than the priors: tiles per network call (memory, not the result)

    @torch.no_grad()
    def __call__(self, ids: list[str], y: torch.Tensor, forward: ForwardModel,
                 estimate: torch.Tensor | None = None) -> DenoiseOutput:
        """``estimate``: (B,) bool, the images whose forward weight is estimated (``forward.alpha: auto``)."""
        t0 = time.perf_counter()
        k = self.settings.n_samples
        b = y.shape[0]
        # sample j of image i sits at row j * B + i; its seed depends only on (id, j, settings seed)
        seeds = [seed_for(i, self.settings.seed, j) for j in range(k) for i in ids]
        out = joint_sample(self.x_model, self.n_model, self.sde, y.repeat(k, 1, 1, 1), forward.repeat(k),
                           self.settings, seeds=seeds, runtime=self.runtime, tile_batch=self.tile_batch,
                           estimate=None if estimate is None else estimate.repeat(k))
        xs = out.x.clamp(0, 1).reshape(k, b, *y.shape[1:])
        ns = out.n.clamp(0, 1).reshape(k, b, *out.n.shape[1:])
        x_hat, n_hat = xs.mean(0), ns.mean(0)
        alpha_hat = None if out.weight is None else out.weight.reshape(k, b).mean(0)
        if alpha_hat is not None and estimate is not None:  # the image part with the weight it was cleaned with
            forward = forward.with_params(**{type(forward).weight: alpha_hat.cpu()})  # type: ignore[misc]
        return DenoiseOutput(
            denoised=x_hat, noise_estimate=n_hat, uncertainty=xs.std(0) if k > 1 else None,
            residual=out.residual.reshape(k, b).mean(0),
            spread=metrics.spread(xs), removed_energy=metrics.removed_energy(y, forward.image_part(x_hat, n_hat), 1.0),
            nfe=out.nfe * k, backward=out.backward, seconds=(time.perf_counter() - t0) / max(b, 1),
            alpha_hat=alpha_hat)


def truth_metrics(x_hat: torch.Tensor, clean: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """PSNR/SSIM of the estimate and of the observation itself against the truth, per image. SSIM is NaN for an
    image smaller than its window (:data:`pipeline.metrics.SSIM_KERNEL`), where it is not defined."""
    y01 = y.clamp(0, 1)
    if min(clean.shape[-2:]) < metrics.SSIM_KERNEL:
        nan = torch.full((clean.shape[0],), float("nan"), device=clean.device)
        return {"psnr": metrics.psnr(x_hat, clean), "ssim": nan, "psnr_input": metrics.psnr(y01, clean),
                "ssim_input": nan}
    return {"psnr": metrics.psnr(x_hat, clean), "ssim": metrics.ssim(x_hat, clean),
            "psnr_input": metrics.psnr(y01, clean), "ssim_input": metrics.ssim(y01, clean)}
