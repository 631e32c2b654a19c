"""Forward models ``y = A(x, n; theta) + sigma_y e`` on images in [0, 1], with per-row parameters.

Used alike by corruption (:mod:`pipeline.data.corrupt`, :meth:`ForwardModel.observe`) and by the joint
sampler (:mod:`pipeline.posterior`, :meth:`ForwardModel.apply` and the coefficients). Decisions:

* **Storage units.** A forward model works on [0, 1] images, not network units ([-1, 1]), so ``sigma_y``
  and the residual mean the same thing to a user as to the sampler; the sampler converts. The blend reads
  the same in both spaces; the sum and the overlay do not (``y`` may exceed 1), which is why they are
  defined here.
* **Every parameter is per row.** A model is a frozen dataclass whose parameters, the read-out noise
  ``sigma_y`` included, are ``(B,)`` float tensors, one value per row of the batch it describes, so one
  batch may mix alphas. :func:`make_forward` builds one from a name and per-row values (a float is
  repeated over the batch); :meth:`~ForwardModel.repeat` stacks it for ``K`` posterior samples (row
  ``j * B + i`` is sample ``j`` of image ``i``, as ``y.repeat(K, 1, 1, 1)``); :meth:`~ForwardModel.take`
  selects rows.
* **Linear models state their coefficients.** ``A(x, n) = c_x x + c_n n`` per row: :attr:`coef_x` and
  :attr:`coef_n` are ``(B,)`` tensors; the final projection, the ``paper`` preset's gradient, the
  Gaussian likelihood's ``Sigma_t`` (:func:`pipeline.posterior.guidance.gaussian_nll`) and the
  removed-energy figure use them.
* **Parameters that a sampler may estimate** (issue 20: a blend whose alpha is unknown). A model names them
  in :attr:`~ForwardModel.estimable`; :meth:`~ForwardModel.with_params` returns the model with new per-row
  values (validated like the constructor's), so an estimating sampler holds its current estimate as a
  forward model and replaces it every step (``forward = forward.with_params(alpha=alpha_hat)``).
  :meth:`~ForwardModel.apply` is plain tensor arithmetic in the parameters too, so a rule can take the
  residual's gradient with respect to an estimable parameter (pass a tensor that requires grad).
  Nothing here estimates: that is the sampler's business.

To add a model: subclass :class:`ForwardModel` (a frozen dataclass whose extra fields are ``(B,)`` tensors),
give it a ``name``, ``apply``, ``coef_x`` / ``coef_n``, and register it in :data:`FORWARD_MODELS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Rows = torch.Tensor | Sequence[float] | float


def _rows(name: str, value: Rows, batch_size: int | None) -> torch.Tensor:
    """``value`` as a (B,) float32 tensor: a float repeated ``batch_size`` times, or one value per row."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        if batch_size is None:
            raise ValueError(f"{name}: one value per row is needed ((B,) tensor), got a scalar")
        return t.expand(batch_size).clone()
    if t.ndim != 1:
        raise ValueError(f"{name}: expected one value per row, shape (B,), got shape {tuple(t.shape)}")
    if batch_size is not None and t.shape[0] != batch_size:
        raise ValueError(f"{name}: {t.shape[0]} values for a batch of {batch_size} rows")
    return t


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast against ``like`` (B, C, H, W), on its device and dtype."""
    return v.to(device=like.device, dtype=like.dtype).reshape(v.shape[0], *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class ForwardModel:
    """``y = A(x, n) + sigma_y e``; ``sigma_y`` and every parameter field are (B,) tensors."""

    sigma_y: torch.Tensor

    name: ClassVar[str] = "base"
    params: ClassVar[dict[str, float | None]] = {}  # per-row parameters and their defaults (None: required)
    estimable: ClassVar[tuple[str, ...]] = ()  # parameters a sampler may estimate (see the module docstring)
    weight: ClassVar[str | None] = None  # the mixing weight that an observation dataset's `alpha` column holds
    linear: ClassVar[bool] = True  # A(x, n) = c_x x + c_n n: coef_x / coef_n exist
    extra_noise_channels: ClassVar[int] = 0  # the noise has the image's channels plus these (composite: alpha)
    pointwise: ClassVar[bool] = True  # each pixel of A(x, n) depends on that pixel alone (a blur would not)
    # the sampler settings a recipe with this model takes where its `sampler` leaves them unset (pipeline.config)
    sampler_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        b = _rows("sigma_y", self.sigma_y, None).shape[0]
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                raise ValueError(f"{self.name} needs {f.name}, one value per row")
            object.__setattr__(self, f.name, _rows(f.name, getattr(self, f.name), b))
        if (self.sigma_y < 0).any():
            raise ValueError(f"sigma_y must be >= 0, got {self.sigma_y.min().item()}")
        self.check()

    def check(self) -> None:
        """Refuse parameter values outside the model's domain (``ValueError`` naming the parameter)."""

    @property
    def batch_size(self) -> int:
        return int(self.sigma_y.shape[0])

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``A(x, n)`` per row, without read-out noise."""
        raise NotImplementedError

    @property
    def coef_x(self) -> torch.Tensor:
        """``c_x`` per row, (B,)."""
        raise NotImplementedError

    @property
    def coef_n(self) -> torch.Tensor:
        """``c_n`` per row, (B,)."""
        raise NotImplementedError

    def weight_terms(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)`` with ``A(x, n) = u + w v`` for the model's weight ``w`` (:attr:`weight`): every shipped model is
        affine in its weight, so the weight that best explains ``y`` given ``(x, n)`` is the least-squares
        ``<y - u, v> / <v, v>`` per row (:mod:`pipeline.posterior.estimate`)."""
        raise NotImplementedError(f"the {self.name} model has no weight to estimate")

    def explain(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The noise that explains ``y`` given the image ``x`` (both in [0, 1]), within [0, 1]: for a linear model
        ``(y - c_x x) / c_n``. What the supervised network's answer implies about the noise."""
        return ((y - _bcast(self.coef_x, y) * x) / _bcast(self.coef_n, y)).clamp(0.0, 1.0)

    def noise_channels(self, channels: int) -> int:
        """Channels of the noise for an image of ``channels``."""
        return channels + self.extra_noise_channels

    def image_part(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The image's term of ``A(x, n)`` (for a linear model ``c_x x``): what is left of ``x`` in ``y``."""
        return _bcast(self.coef_x, x) * x

    def project(self, y: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move ``(x, n)`` the least distance (``||dx||^2 + ||dn||^2``) that explains the residual of ``y``.

        With read-out noise, only the part of the residual above ``sigma_y`` is removed: per sample the
        correction is shrunk by ``max(0, 1 - sigma_y / rms(r))``, leaving a residual of RMS ``sigma_y``.
        Every coefficient is the row's own."""
        r = self._shrunk(y - self.apply(x, n))
        cx, cn = _bcast(self.coef_x, r), _bcast(self.coef_n, r)
        c = cx**2 + cn**2
        return x + cx / c * r, n + cn / c * r

    def _shrunk(self, r: torch.Tensor) -> torch.Tensor:
        sigma_y = self.sigma_y.to(r.device)
        if (sigma_y > 0).any():
            rms = r.pow(2).flatten(1).mean(1).sqrt()
            r = r * _bcast((1 - sigma_y / rms.clamp_min(1e-20)).clamp(0, 1), r)
        return r

    def observe(self, x: torch.Tensor, n: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A noisy observation of ``(x, n)``: read-out noise of each row's ``sigma_y``, drawn from ``generator``."""
        y = self.apply(x, n)
        if (self.sigma_y > 0).any():
            e = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
            y = y + _bcast(self.sigma_y, y) * e
        return y

    def _map(self, fn: Any) -> ForwardModel:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def repeat(self, k: int) -> ForwardModel:
        """The model for ``K`` stacked copies of the batch: row ``j * B + i`` has row ``i``'s parameters."""
        return self._map(lambda t: t.repeat(k))

    def take(self, index: torch.Tensor | Sequence[int] | slice) -> ForwardModel:
        """The model of the rows ``index`` (a slice, indices or a boolean mask)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> ForwardModel:
        """The model with its parameters on ``device``."""
        return self._map(lambda t: t.to(device))

    def with_params(self, **values: Rows) -> ForwardModel:
        """This model with new per-row values of some parameters (e.g. an estimate of an estimable one)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"{self.name} has no parameter {', '.join(unknown)}; it has "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **{k: _rows(k, v, self.batch_size) for k, v in values.items()})


@dataclass(frozen=True, eq=False)
class Blend(ForwardModel):
    """``y = (1 - alpha) x + alpha n`` (the paper's model; alpha = 0.5 for CelebA + MNIST), alpha in (0, 1)."""

    alpha: torch.Tensor = None  # type: ignore[assignment]  # required: make_forward or Blend(sigma_y, alpha)

    name: ClassVar[str] = "blend"
    params: ClassVar[dict[str, float | None]] = {"alpha": 0.5}
    estimable: ClassVar[tuple[str, ...]] = ("alpha",)
    weight: ClassVar[str | None] = "alpha"

    def check(self) -> None:
        bad = ~((self.alpha > 0) & (self.alpha < 1))
        if bad.any():
            raise ValueError(f"blend alpha must be in (0, 1), got {self.alpha[bad][0].item():g}")

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.alpha, x)
        return (1.0 - a) * x + a * n

    def weight_terms(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, n - x

    @property
    def coef_x(self) -> torch.Tensor:
        return 1.0 - self.alpha

    @property
    def coef_n(self) -> torch.Tensor:
        return self.alpha


@dataclass(frozen=True, eq=False)
class Sum(ForwardModel):
    """``y = x + n`` on [0, 1] images, so ``y`` lies in [0, 2]."""

    name: ClassVar[str] = "sum"

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return x + n

    @property
    def coef_x(self) -> torch.Tensor:
        return torch.ones_like(self.sigma_y)

    @property
    def coef_n(self) -> torch.Tensor:
        return torch.ones_like(self.sigma_y)


@dataclass(frozen=True, eq=False)
class Overlay(ForwardModel):
    """``y = x + a n`` on [0, 1] images with ``a >= 0`` per row (an additive overlay: text, stripes, haze);
    ``y`` may exceed 1."""

    a: torch.Tensor = None  # type: ignore[assignment]  # required

    name: ClassVar[str] = "overlay"
    params: ClassVar[dict[str, float | None]] = {"a": None}
    estimable: ClassVar[tuple[str, ...]] = ("a",)
    weight: ClassVar[str | None] = "a"

    def check(self) -> None:
        bad = ~(self.a >= 0) | ~torch.isfinite(self.a)
        if bad.any():
            raise ValueError(f"overlay a must be finite and >= 0, got {self.a[bad][0].item():g}")

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return x + _bcast(self.a, n) * n

    def weight_terms(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, n

    @property
    def coef_x(self) -> torch.Tensor:
        return torch.ones_like(self.a)

    @property
    def coef_n(self) -> torch.Tensor:
        return self.a


@dataclass(frozen=True, eq=False)
class Composite(ForwardModel):
    """``y = (1 - a m) x + a m c``: an RGBA layer (colour ``c``, antialiased coverage ``m``, both in [0, 1]) composited
    over the image with strength ``a`` in (0, 1] per row, as editors and watermarking tools put text on photos. The
    noise is the layer: the image's channels (``c``) then one of coverage (``m``), so a text prior is RGBA.

    Not linear (``m`` multiplies both ``x`` and ``c``): rules and solvers that need ``coef_x`` / ``coef_n`` (a
    Gaussian likelihood, the ``paper`` preset) refuse it; ``dps`` and ``projection`` differentiate ``apply``.
    :meth:`project` moves ``(x, c)`` the least distance that explains ``y`` with the coverage held: given ``m``
    the model is linear in ``(x, c)``, per pixel, with coefficients ``1 - a m`` and ``a m`` (``m`` within [0, 1]).
    :meth:`apply` takes the product's factors within [0, 1] (see there)."""

    a: torch.Tensor = None  # type: ignore[assignment]  # required

    name: ClassVar[str] = "composite"
    params: ClassVar[dict[str, float | None]] = {"a": 1.0}
    estimable: ClassVar[tuple[str, ...]] = ("a",)
    weight: ClassVar[str | None] = "a"
    linear: ClassVar[bool] = False
    extra_noise_channels: ClassVar[int] = 1
    # measured on bench large's validation crops: `dps` lands below the observation (its gradient through the text
    # network hardly moves the coverage where the text is, even with the image known) and the final projection puts
    # what the layer missed back into the image (docs/how-to/text-overlays.md)
    sampler_defaults: ClassVar[dict[str, Any]] = {"rule": "projection", "final_projection": False}

    def check(self) -> None:
        bad = ~((self.a > 0) & (self.a <= 1))
        if bad.any():
            raise ValueError(f"composite a must be in (0, 1], got {self.a[bad][0].item():g}")

    def _split(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, a m)`` of the layer ``n`` for the image ``x``."""
        if n.shape[1] != x.shape[1] + 1:
            raise ValueError(f"the composite overlay's noise is a layer of the image's {x.shape[1]} channel(s) of "
                             f"colour and one of coverage; got {n.shape[1]} channel(s): use an RGBA noise prior "
                             "(e.g. text) with an RGB image prior")
        return n[:, :-1], _bcast(self.a, n) * n[:, -1:]

    def apply(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``x + a m (c - x)`` with ``m``, ``c`` and ``x`` in the product taken within [0, 1]: the model itself for
        images and layers in range, and derivatives that stay bounded (by 1 and ``a``) when a sampler's early
        estimates leave it, as Tweedie's estimates far from ``t = 0`` do; unbounded, the product's derivative
        grows with them and the guidance runs away."""
        c, am = self._split(x, n)
        am = am.clamp(0.0, 1.0)
        return x + am * (c.clamp(0.0, 1.0) - x.clamp(0.0, 1.0))

    def image_part(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return (1.0 - self._split(x, n)[1].clamp(0.0, 1.0)) * x

    def weight_terms(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = n[:, -1:].clamp(0.0, 1.0)
        return x, m * (n[:, :-1].clamp(0.0, 1.0) - x.clamp(0.0, 1.0))

    def project(self, y: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, am = self._split(x, n)
        am = am.clamp(0.0, 1.0)
        r = self._shrunk(y - ((1.0 - am) * x + am * c))
        k = (1.0 - am) ** 2 + am**2  # at least 1/2
        return x + (1.0 - am) / k * r, torch.cat([c + am / k * r, n[:, -1:]], dim=1)

    def explain(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer of least coverage that explains ``y`` over ``x``: per pixel, the smallest ``m`` in [0, 1] for
        which the colour ``c = x + (y - x) / (a m)`` stays within [0, 1] in every channel, and that ``c`` (``x``
        where ``m`` is 0). Where even ``m = 1`` cannot (``a < 1`` and ``y`` far from ``x``), ``c`` is clipped."""
        a = _bcast(self.a, y)
        d = y - x
        room = torch.where(d > 0, 1.0 - x, x).clamp_min(1e-6)  # how far c may move from x towards d's side
        m = (d.abs() / (a * room)).amax(1, keepdim=True).clamp(0.0, 1.0)
        c = torch.where(m > 0, x + d / (a * m).clamp_min(1e-6), x).clamp(0.0, 1.0)
        return torch.cat([c, m], dim=1)

    @property
    def coef_x(self) -> torch.Tensor:
        raise NotImplementedError(self._not_linear())

    @property
    def coef_n(self) -> torch.Tensor:
        raise NotImplementedError(self._not_linear())

    def _not_linear(self) -> str:
        return (f"the {self.name} forward model is not linear (its coverage multiplies the image): what needs "
                "coef_x / coef_n (a Gaussian likelihood, the paper preset) cannot use it; use sampler.rule=dps or "
                "projection with sampler.solver=ddim")


FORWARD_MODELS: dict[str, type[ForwardModel]] = {m.name: m for m in (Blend, Sum, Overlay, Composite)}


def make_forward(name: str, batch_size: int, sigma_y: Rows = 0.0, **params: Rows | None) -> ForwardModel:
    """The forward model ``name`` for a batch of ``batch_size`` rows; each parameter a float (every row) or
    one value per row. A parameter left out (or None) takes the model's default; ``ValueError`` for an
    unknown name, an unknown parameter or a required one missing."""
    if name not in FORWARD_MODELS:
        raise ValueError(f"unknown forward model {name!r}; choose one of {', '.join(FORWARD_MODELS)}")
    cls = FORWARD_MODELS[name]
    unknown = sorted(set(params) - set(cls.params))
    if unknown:
        raise ValueError(f"forward model {name!r} has no parameter {', '.join(unknown)}"
                         + (f"; it has {', '.join(cls.params)}" if cls.params else "; it takes only sigma_y"))
    values: dict[str, Any] = {}
    for p, default in cls.params.items():
        v = params.get(p)
        v = default if v is None else v
        if v is None:
            raise ValueError(f"forward model {name!r} needs {p}")
        values[p] = _rows(p, v, batch_size)
    return cls(sigma_y=_rows("sigma_y", sigma_y, batch_size), **values)
