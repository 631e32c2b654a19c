"""Classical baselines a user would otherwise reach for, on the same observations.

Each takes observations ``y`` in [0, 1] units, (B, C, H, W) float tensors, and a parameter, and returns
an estimate of the clean image in [0, 1]. They denoise ``y`` as it is, without knowing the forward
model (that is what a user of these tools does); their parameter is tuned on the validation split.

* ``observation``: ``y`` itself (clipped to [0, 1]);
* ``nlm``: scikit-image non-local means, parameter ``h`` (filter strength);
* ``tv``: scikit-image total-variation denoising (Chambolle), parameter ``weight``;
* ``bm3d``: BM3D (the ``bm3d`` package, optional), parameter ``sigma_psd``.

The ``gaussian`` baseline is not here: it is the joint sampler with the noise prior replaced by a
:class:`pipeline.posterior.priors.GaussianPrior` fitted to the noise training images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Baseline = Callable[[torch.Tensor, float], torch.Tensor]


def _per_image(fn: Callable[[np.ndarray, float], np.ndarray]) -> Baseline:
    def run(y: torch.Tensor, param: float) -> torch.Tensor:
        out = []
        for img in y.clamp(0, 1).double().cpu().numpy():
            hwc = np.moveaxis(img, 0, -1)
            res = fn(hwc[..., 0] if hwc.shape[-1] == 1 else hwc, param)
            out.append(np.moveaxis(res.reshape(hwc.shape), -1, 0))
        return torch.from_numpy(np.clip(np.stack(out), 0, 1)).float()
    return run


def _observation(img: np.ndarray, _param: float) -> np.ndarray:
    return img


def _nlm(img: np.ndarray, h: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(img, h=h, patch_size=3, patch_distance=5, fast_mode=True,
                            channel_axis=-1 if img.ndim == 3 else None)


def _tv(img: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(img, weight=weight, channel_axis=-1 if img.ndim == 3 else None)


def _bm3d(img: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    if img.ndim == 3:
        return bm3d.bm3d_rgb(img, sigma)
    return bm3d.bm3d(img, sigma_psd=sigma)


def bm3d_available() -> bool:
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True


BASELINES: dict[str, Baseline] = {
    "observation": _per_image(_observation),
    "nlm": _per_image(_nlm),
    "tv": _per_image(_tv),
    "bm3d": _per_image(_bm3d),
}

# Validation grids for tuning (a small grid; the best mean PSNR on the validation split wins).
GRIDS: dict[str, list[float]] = {
    "observation": [0.0],
    "nlm": [0.05, 0.1, 0.2, 0.3, 0.5],
    "tv": [0.05, 0.1, 0.2, 0.4, 0.8],
    "bm3d": [0.05, 0.1, 0.2, 0.4],
}
