"""Per-image quality figures on [0, 1] images, shape (B, C, H, W).

With ground truth: PSNR and SSIM, written here in a few lines of torch. SSIM uses the Gaussian window of
Wang et al. (sigma 1.5, 11x11, normalised), population (co)variances, C1 = 0.01^2 and C2 = 0.03^2, and averages
the SSIM map over the positions where the window lies inside the image (a 5-pixel border left out), as
scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)`` does; ``tests/test_metrics.py`` checks the match to 1e-4. (torchmetrics computed the same map
but pulled in SciPy's signal module: 1.4 s of imports in every actor and command.)

Without ground truth (a user's own bucket) PSNR/SSIM are null and these stand in:
``residual`` = RMS of ``y - A(x_hat, n_hat)`` (data consistency), ``spread`` = mean per-pixel
standard deviation over posterior samples, ``removed_energy`` = RMS of ``y - c_x x_hat`` (what
the cleaning took out of the observation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_KERNEL = 11
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K1 * data range)^2, (K2 * data range)^2, data range 1


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (data range 1); inf for identical images."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse)).float()


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image over the pixels where ``mask`` (broadcast to the images) is true; NaN for an image
    with no such pixel."""
    m = mask.expand_as(target).flatten(1).double()
    se = (pred.double() - target.double()).pow(2).flatten(1)
    mse = (se * m).sum(1) / m.sum(1)
    return (-10.0 * torch.log10(mse)).float()


def _blur(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``z`` (B, C, H, W) filtered channel by channel with the separable window ``g``, valid positions only."""
    c, k = z.shape[1], g.numel()
    z = F.conv2d(z, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(z, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(pred: torch.Tensor, target: torch.Tensor, strip: int = 256) -> torch.Tensor:
    """SSIM per image, matching scikit-image's Gaussian-window SSIM (see module docstring). The map is computed
    in strips of ``strip`` rows (each read with the window's 10 rows of margin), so memory is bounded by a strip,
    not by the image; the mean over the strips is the whole map's mean."""
    if min(pred.shape[-2:]) < SSIM_KERNEL:
        raise ValueError(f"SSIM needs images of at least {SSIM_KERNEL}x{SSIM_KERNEL}, got {tuple(pred.shape[-2:])}")
    x = torch.arange(SSIM_KERNEL, dtype=torch.float64, device=pred.device) - (SSIM_KERNEL - 1) / 2
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    rows = pred.shape[-2] - SSIM_KERNEL + 1  # rows of the valid map
    total = torch.zeros(pred.shape[0], dtype=torch.float64, device=pred.device)
    count = 0
    for r0 in range(0, rows, strip):
        r1 = min(rows, r0 + strip)
        rows_in = slice(r0, r1 + SSIM_KERNEL - 1)
        m = _ssim_map(pred[..., rows_in, :].double(), target[..., rows_in, :].double(), g)
        total += m.sum(dim=(1, 2, 3))
        count += m[0].numel()
    return (total / count).float()


def _ssim_map(p: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    mu_p, mu_t = _blur(p, g), _blur(t, g)
    var_p = _blur(p * p, g) - mu_p**2
    var_t = _blur(t * t, g) - mu_t**2
    cov = _blur(p * t, g) - mu_p * mu_t
    num = (2 * mu_p * mu_t + SSIM_C1) * (2 * cov + SSIM_C2)
    return num / ((mu_p**2 + mu_t**2 + SSIM_C1) * (var_p + var_t + SSIM_C2))


def residual(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """RMS per image of the data-consistency residual ``y - A(x_hat, n_hat)``."""
    return (y - y_hat).pow(2).flatten(1).mean(1).sqrt()


def spread(samples: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel posterior standard deviation, from samples shaped (K, B, C, H, W)."""
    if samples.shape[0] < 2:
        return torch.full((samples.shape[1],), float("nan"))
    return samples.std(0).flatten(1).mean(1)


def removed_energy(y: torch.Tensor, x_hat: torch.Tensor, coef_x: torch.Tensor | float) -> torch.Tensor:
    """RMS per image of ``y - c_x x_hat``: what cleaning removed from the observation (``c_x`` a number, or per
    row shaped to broadcast against ``y``)."""
    return (y - coef_x * x_hat).pow(2).flatten(1).mean(1).sqrt()
