"""How the joint sampler's networks run on a GPU, and how large a batch fits: plain torch.

The sampler itself (:mod:`pipeline.posterior.sampler`, :mod:`pipeline.posterior.guidance`) decides what
is computed; this module only how the networks are called, so ``pipeline/bench/gpu.py`` and the product
share it.

**The GPU path** (:class:`Runtime`): how the networks are called, never what the sampler computes.

* ``precision="bf16"``: each network call runs under ``torch.autocast(device_type, torch.bfloat16)``;
  its output is cast back to float32, so the state ``x, n``, Tweedie's estimates, the residual, the
  loss and its gradients stay in float32 (the vector-Jacobian product flows back through the bf16
  network, as autocast records it).
* ``channels_last``: the networks' weights and their inputs in ``torch.channels_last`` memory format
  (NHWC: what tensor-core convolutions want); outputs come back contiguous. Same numbers.
* ``compile``: each network wrapped once in ``torch.compile`` (cached per module), so its forward and
  backward run as fused kernels. Slow to start (tens of seconds per network on a GPU, minutes on a
  small CPU); pays off over hundreds of steps.

:func:`auto_batch_size` sizes a batch from the free GPU memory: it measures the peak memory of one
sampler step at two small batches, takes the growth per sample, and fills ``margin`` of what is free.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.diffusion.sde import VPSDE
from pipeline.forward import ForwardModel
from pipeline.posterior.guidance import GuidedDenoiser, Net
from pipeline.posterior.sampler import SamplerSettings

# --- the GPU path ------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    """How the networks run (see the module docstring). The default changes nothing."""

    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def resolve(cls, device: torch.device | str, precision: str = "auto", channels_last: bool | str = "auto",
                compile: bool | str = False) -> Runtime:
        """Settings where ``"auto"`` means: bf16 / channels-last / compiled when ``device`` is CUDA."""
        cuda = torch.device(device).type == "cuda"

        def on(v: bool | str) -> bool:
            if v == "auto":
                return cuda
            if isinstance(v, bool):
                return v
            raise ValueError(f"expected true, false or auto, got {v!r}")

        prec = ("bf16" if cuda else "fp32") if precision == "auto" else precision
        return cls(prec, on(channels_last), on(compile))  # type: ignore[arg-type]

    @property
    def is_default(self) -> bool:
        return self == Runtime()

    def wrap(self, model: Net, device: torch.device | str) -> Net:
        """``model`` as the sampler should call it under these settings (``model`` itself by default).

        Converts ``model``'s weights to channels-last in place when asked."""
        if self.is_default:
            return model
        if self.channels_last and isinstance(model, nn.Module):
            model.to(memory_format=torch.channels_last)
        fn = compiled(model) if self.compile and isinstance(model, nn.Module) else model
        return _NetCall(fn, torch.device(device).type, self.precision == "bf16", self.channels_last)


class _NetCall:
    """A network call under autocast / channels-last; the output is float32 and contiguous."""

    def __init__(self, fn: Net, device_type: str, bf16: bool, channels_last: bool):
        self.fn, self.device_type, self.bf16, self.channels_last = fn, device_type, bf16, channels_last

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.fn(x, t)
        return out.float().contiguous()


_COMPILED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def compiled(model: nn.Module, **options: Any) -> Any:
    """``torch.compile(model)``, made once per module and cached (a second sampler reuses it)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, **options)
    return _COMPILED[model]


def batch_from_memory(free_bytes: int, per_sample_bytes: float, fixed_bytes: float = 0.0, margin: float = 0.8,
                      cap: int = 512, multiple: int = 8) -> int:
    """The largest batch whose step fits in ``margin`` of ``free_bytes``: ``fixed + B per_sample``.

    Rounded down to a multiple of ``multiple`` (tensor-core friendly) when that leaves at least one
    multiple, and capped at ``cap`` (beyond a few hundred images the GPU is full anyway, and a batch
    is the unit that is lost when a worker dies). Never below 1."""
    if per_sample_bytes <= 0:
        raise ValueError(f"per_sample_bytes must be positive, got {per_sample_bytes}")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    b = int((free_bytes * margin - fixed_bytes) // per_sample_bytes)
    if multiple > 1 and b >= multiple:
        b -= b % multiple
    return max(1, min(cap, b))


def measure_step_bytes(x_model: Net, n_model: Net, sde: VPSDE, forward: ForwardModel, shape: Sequence[int],
                       device: torch.device | str, settings: SamplerSettings, batches: tuple[int, int] = (2, 6),
                       ) -> tuple[float, float]:
    """``(per_sample, fixed)`` CUDA bytes of one sampler step (both networks, their vector-Jacobian
    products, the update): the step's peak above what was allocated before it, at two batch sizes (each
    measured on its second call), fitted as ``fixed + B per_sample``. ``forward`` is the model of one row,
    repeated over each measured batch. The models must already be wrapped (:meth:`Runtime.wrap`), preferably
    without compiling: eager memory is the larger, so the safer, figure."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measuring step memory needs a CUDA device, got {device}")
    peaks = []
    for b in batches:
        y = torch.rand(b, *shape, device=device)
        d = GuidedDenoiser(x_model, n_model, sde, forward.take([0] * b).to(device), y, settings)
        x = torch.randn_like(y)
        n = torch.randn(b, forward.noise_channels(shape[0]), *shape[1:], device=device)
        t = torch.full((b,), 0.5, device=device)
        dt = torch.tensor(1.0 / settings.steps, device=device)
        # a first call at this shape does any one-off work (cuDNN autotuning and its workspaces) unmeasured
        d(x, n, t, dt)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = d(x, n, t, dt)
        x = x - out.dx  # the update's temporaries
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del out, x, n, y, d
    (b0, b1), (p0, p1) = batches, peaks
    per_sample = (p1 - p0) / (b1 - b0)
    if per_sample <= 0:  # allocator caching blurred the difference: charge the whole peak per sample
        return p1 / b1, 0.0
    return per_sample, max(0.0, p0 - b0 * per_sample)


def auto_batch_size(x_model: Net, n_model: Net, sde: VPSDE, forward: ForwardModel, shape: Sequence[int],
                    device: torch.device | str, settings: SamplerSettings, default: int = 32, n_samples: int = 1,
                    free_bytes: int | None = None, per_sample_bytes: float | None = None, fixed_bytes: float = 0.0,
                    margin: float = 0.8, cap: int = 512) -> int:
    """Images per batch for the joint sampler on ``device``.

    On a CPU (and without injected figures) this is ``default``. On CUDA, ``free_bytes`` defaults to
    ``torch.cuda.mem_get_info`` and ``per_sample_bytes`` / ``fixed_bytes`` to :func:`measure_step_bytes`;
    the batch of sampler rows from :func:`batch_from_memory` is divided by ``n_samples`` (each image runs
    as ``n_samples`` rows). Pass both figures to size a batch without a GPU (tests, planning)."""
    device = torch.device(device)
    if device.type != "cuda" and (free_bytes is None or per_sample_bytes is None):
        return default
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if per_sample_bytes is None:
        per_sample_bytes, fixed_bytes = measure_step_bytes(x_model, n_model, sde, forward, shape, device,
                                                           settings)
    rows = batch_from_memory(free_bytes, per_sample_bytes, fixed_bytes, margin=margin, cap=cap)
    return max(1, rows // max(1, n_samples))
