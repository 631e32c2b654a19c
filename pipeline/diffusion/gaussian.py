"""A per-pixel Gaussian prior with a closed-form score: an epsilon-"network" that a model folder can hold.

``x_0 ~ N(mu, v)`` (network units, per pixel) gives the marginal ``x_t ~ N(a_t mu, a_t^2 v + s_t^2)``, so the
epsilon a perfect network would predict is ``e(x_t, t) = s_t (x_t - a_t mu) / (a_t^2 v + s_t^2)``.

It serves the ``gaussian`` baseline, the sampler's tests (posteriors known in closed form), and round 0 of
learning an image prior from corrupted data (:mod:`pipeline.posterior.em`, ``jointdiff learn-prior``): saved as a
model folder (:func:`pipeline.diffusion.checkpoint.save_model`: ``config.json`` with a ``gaussian`` section
instead of ``unet``, the weights ``mean`` and ``var``), a cleaning run loads it like any prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.diffusion.nets import check_channels
from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.settings import check_fields, pydantic_model


@dataclass(frozen=True)
class GaussianShape:
    """The shape of a saved per-pixel Gaussian prior: what a cleaning run needs of a prior's config (``channels``,
    ``image_size``), as a U-Net's config has it."""

    image_size: int = field(default=32, metadata={"ge": 1, "le": 4096, "description": "square image size"})
    channels: int = field(default=1, metadata={"check": check_channels, "description": "1, 3 or 4"})

    def __post_init__(self) -> None:
        check_fields(self)


GaussianConfig = pydantic_model(GaussianShape, "GaussianConfig", __name__)


class GaussianPrior(nn.Module):
    """An epsilon-"network" for ``N(mean, var)`` data; ``mean`` and ``var`` broadcast to (C, H, W)."""

    def __init__(self, mean: torch.Tensor | float, var: torch.Tensor | float, sde: VPSDE):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("var", torch.as_tensor(var, dtype=torch.float32))
        self.sde = sde

    @property
    def config(self) -> GaussianShape:
        """The shape, for a per-pixel prior (``mean`` of shape (C, S, S)). A scalar prior has none (an
        ``AttributeError``, so ``getattr(prior, "config", None)`` is None: the sampler does not tile for it)."""
        if self.mean.dim() != 3 or self.mean.shape[-1] != self.mean.shape[-2]:
            raise AttributeError("a scalar Gaussian prior has no image shape")
        return GaussianShape(image_size=int(self.mean.shape[-1]), channels=int(self.mean.shape[0]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.sde.alpha(t), x)
        s = _bcast(self.sde.sigma(t), x)
        return s * (x - a * self.mean) / (a**2 * self.var + s**2)

    @classmethod
    def fit(cls, images01: torch.Tensor, sde: VPSDE, per_pixel: bool = False) -> GaussianPrior:
        """Moment-match [0, 1] training images (in network units): one mean/var, or one per pixel."""
        x = images01 * 2 - 1
        if per_pixel:
            return cls(x.mean(0), x.var(0).clamp_min(1e-4), sde)
        return cls(x.mean(), x.var().clamp_min(1e-4), sde)
