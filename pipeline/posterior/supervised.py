"""The supervised competitor: a U-Net that maps an observation to the clean image in one evaluation.

What a practitioner with our training data builds first: (clean, noisy) pairs synthesised on the fly from the clean
training images and the noise training images, blended with a weight drawn per pair from :data:`WEIGHT_RANGES`
(``blend``: alpha from U[0.2, 0.8]; the composited overlay: ``a`` from U[0.5, 1.0]), and a network trained with
the mean squared error to give the clean image back. The network is the priors' U-Net (:class:`UNet`) with its
time input held at 0: blind to the weight, as a user's observation tells it nothing of it. It is evaluated on
images of any size tile by tile (:func:`pipeline.diffusion.tiles.tiled`), as the priors are.

Its training (:class:`SupervisedTrainer`) is :class:`pipeline.diffusion.train.Trainer`'s (AdamW, warm-up,
clipping, EMA, resumable states, one generator for every draw) with another batch and loss; the model folder it
exports is a U-Net's with ``meta.task = "supervised"`` (:data:`TASK`) and the pair it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.diffusion.nets import NetConfig, UNet
from pipeline.diffusion.tiles import Tiling, tiled
from pipeline.diffusion.train import PatchPool, Trainer, TrainSettings, draw_images
from pipeline.diffusion.unet import count_parameters
from pipeline.forward import FORWARD_MODELS, make_forward

TASK = "supervised"
WEIGHT_RANGES: dict[str, tuple[float, float]] = {"blend": (0.2, 0.8), "composite": (0.5, 1.0)}
TILE_OVERLAP = 8


@dataclass(frozen=True)
class NoiseDraw:
    """How the noise training images are drawn: the noise prior's own augmentation settings."""

    hflip: bool
    shift: int
    grey_to_rgb: str
    channels: int


def synthesize(x01: torch.Tensor, n01: torch.Tensor, forward: str, weights: torch.Tensor) -> torch.Tensor:
    """Observations of clean images ``x01`` under noise ``n01`` (both [0, 1]) with one weight per row (the forward
    model's :attr:`~pipeline.forward.ForwardModel.weight`), clipped to [0, 1] as a sensor's range."""
    fm = make_forward(forward, x01.shape[0], **{FORWARD_MODELS[forward].weight: weights})
    return fm.apply(x01, n01).clamp(0.0, 1.0)


def matched_budget(parts: list[tuple[int, int, int]], batch_size: int, params: int) -> int:
    """The steps at ``batch_size`` of a ``params``-parameter network that spend the compute of ``parts``, each
    ``(steps, batch size, parameters)``: sum(steps x batch x parameters) / (batch_size x params), rounded."""
    return max(1, round(sum(s * b * p for s, b, p in parts) / (batch_size * params)))


def width_for(net: NetConfig, params: int) -> NetConfig:
    """``net`` with the ``base_channels`` (8 to 256) whose parameter count is nearest ``params``."""
    def count(width: int) -> int:
        with torch.device("meta"):
            return count_parameters(UNet(NetConfig(**{**net.__dict__, "base_channels": width})))

    best = min(range(8, 257), key=lambda w: abs(count(w) - params))
    return NetConfig(**{**net.__dict__, "base_channels": best})


class SupervisedTrainer(Trainer):
    """:class:`Trainer` for the supervised network: a batch is a pair ``(observation, clean)`` drawn by
    :meth:`draw_batch` from ``(clean images, noise images)``; the loss is the mean squared error of the network's
    output (time 0) against the clean image, in network units ([-1, 1])."""

    def __init__(self, settings: TrainSettings, noise: NoiseDraw, forward: str,
                 weight_range: tuple[float, float], device: torch.device | str = "cpu"):
        super().__init__(settings, device)
        self.noise = noise
        self.forward = forward
        self.weight_range = weight_range

    def draw_batch(self, data: tuple[torch.Tensor | PatchPool, torch.Tensor | PatchPool]  # type: ignore[override]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        clean, noise = data
        x0 = super().draw_batch(clean)
        nd = self.noise
        n0 = draw_images(noise, x0.shape[0], self.generator, hflip=nd.hflip, shift=nd.shift,
                         grey_to_rgb=nd.grey_to_rgb, channels=nd.channels)
        lo, hi = self.weight_range
        w = lo + (hi - lo) * torch.rand(x0.shape[0], generator=self.generator, device=x0.device)
        y = synthesize((x0 + 1) / 2, (n0 + 1) / 2, self.forward, w)
        return y * 2 - 1, x0

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:  # type: ignore[override]
        return self._optimise(lambda net: pair_loss(net, *batch))


def pair_loss(net: torch.nn.Module, y: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``net(y, 0)`` against ``x0`` (network units)."""
    return (net(y, torch.zeros(y.shape[0], device=y.device)) - x0).pow(2).mean()


def is_supervised(meta: dict[str, Any]) -> bool:
    """Whether a model folder's ``meta`` is a supervised network's."""
    return meta.get("task") == TASK


@torch.no_grad()
def restore(model: torch.nn.Module, y01: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The network's clean image for observations ``y01`` ``(B, C, H, W)`` in [0, 1], of any size: tiles of the
    network's size overlapping by :data:`TILE_OVERLAP`, blended; [0, 1]."""
    size = model.config.image_size
    h, w = y01.shape[-2:]
    tiling = Tiling(h, w, size, 0 if (h, w) == (size, size) else TILE_OVERLAP)
    t = torch.zeros(y01.shape[0], device=y01.device)
    out = tiled(model, y01 * 2 - 1, t, tiling, batch)
    return ((out + 1) / 2).clamp(0.0, 1.0)
