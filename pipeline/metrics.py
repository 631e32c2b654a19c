"""Per-image quality figures on [0, 1] images, shape (B, C, H, W).

With ground truth: PSNR and SSIM via torchmetrics. SSIM uses the Gaussian window of Wang et al.
(sigma 1.5, 11x11) and, like scikit-image's ``structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)``, averages the SSIM map over the image minus
a 5-pixel border (torchmetrics alone averages over reflect-padded borders too, which differs by
~1e-3); ``tests/test_metrics.py`` checks the match to 1e-4.

Without ground truth (a user's own bucket) PSNR/SSIM are null and these stand in:
``residual`` = RMS of ``y - A(x_hat, n_hat)`` (data consistency), ``spread`` = mean per-pixel
standard deviation over posterior samples, ``removed_energy`` = RMS of ``y - c_x x_hat`` (what
the cleaning took out of the observation).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

SSIM_SIGMA = 1.5
SSIM_KERNEL = 11
SSIM_CROP = (SSIM_KERNEL - 1) // 2


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (data range 1)."""
    return peak_signal_noise_ratio(pred.double(), target.double(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3)).float()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image, matching scikit-image's Gaussian-window SSIM (see module docstring)."""
    if min(pred.shape[-2:]) < SSIM_KERNEL:
        raise ValueError(f"SSIM needs images of at least {SSIM_KERNEL}x{SSIM_KERNEL}, got {tuple(pred.shape[-2:])}")
    _, full = structural_similarity_index_measure(
        pred.double(), target.double(), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        data_range=1.0, reduction="none", return_full_image=True)
    c = SSIM_CROP
    return full[..., c:-c, c:-c].mean(dim=(1, 2, 3)).float()


def residual(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """RMS per image of the data-consistency residual ``y - A(x_hat, n_hat)``."""
    return (y - y_hat).pow(2).flatten(1).mean(1).sqrt()


def spread(samples: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel posterior standard deviation, from samples shaped (K, B, C, H, W)."""
    if samples.shape[0] < 2:
        return torch.full((samples.shape[1],), float("nan"))
    return samples.std(0).flatten(1).mean(1)


def removed_energy(y: torch.Tensor, x_hat: torch.Tensor, coef_x: float) -> torch.Tensor:
    """RMS per image of ``y - c_x x_hat``: what cleaning removed from the observation."""
    return (y - coef_x * x_hat).pow(2).flatten(1).mean(1).sqrt()
