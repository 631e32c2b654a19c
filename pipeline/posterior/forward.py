"""Forward models ``y = A(x, n) + sigma_y e``, on images in [0, 1].

Forward models work in storage units ([0, 1]), not network units ([-1, 1]), so ``sigma_y`` and the
residual mean the same thing to a user as to the sampler; the sampler converts. The blend reads the
same in both spaces; the sum does not (``y`` lies in [0, 2]), which is why it is defined here.

A forward model that is linear, ``A(x, n) = c_x x + c_n n + c_0``, states ``coef_x`` and ``coef_n``;
the ``tweedie`` rule uses them to propagate the priors' posterior variances into ``Sigma_t``. To add a
model, subclass :class:`ForwardModel` and register it in :data:`FORWARD_MODELS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardModel:
    sigma_y: float = 0.0

    name = "base"

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def coef_x(self) -> float:
        raise NotImplementedError

    @property
    def coef_n(self) -> float:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, n: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A noisy observation of ``(x, n)`` (read-out noise drawn from ``generator``)."""
        y = self.apply(x, n)
        if self.sigma_y > 0:
            y = y + self.sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return y


@dataclass(frozen=True)
class Blend(ForwardModel):
    """``y = (1 - alpha) x + alpha n`` (the paper's model; alpha = 0.5 for CelebA + MNIST)."""

    alpha: float = 0.5
    name = "blend"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"blend alpha must be in (0, 1), got {self.alpha}")

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.alpha) * x + self.alpha * n

    @property
    def coef_x(self) -> float:
        return 1.0 - self.alpha

    @property
    def coef_n(self) -> float:
        return self.alpha


@dataclass(frozen=True)
class Sum(ForwardModel):
    """``y = x + n`` on [0, 1] images, so ``y`` lies in [0, 2]."""

    name = "sum"

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return x + n

    @property
    def coef_x(self) -> float:
        return 1.0

    @property
    def coef_n(self) -> float:
        return 1.0


FORWARD_MODELS: dict[str, type[ForwardModel]] = {"blend": Blend, "sum": Sum}


def make_forward(name: str, alpha: float = 0.5, sigma_y: float = 0.0) -> ForwardModel:
    if name not in FORWARD_MODELS:
        raise ValueError(f"unknown forward model '{name}'; choose one of {', '.join(FORWARD_MODELS)}")
    if name == "blend":
        return Blend(sigma_y=sigma_y, alpha=alpha)
    return FORWARD_MODELS[name](sigma_y=sigma_y)
