"""The joint sampler's step loop in plain torch: no pydantic, no torchmetrics, no storage.

:mod:`pipeline.posterior.sampler` wraps this loop with its validated ``SamplerConfig``, the per-image
seeds and the result bookkeeping; ``pipeline/bench/gpu.py`` runs the very same loop on a bare GPU
machine that has only torch and numpy. The math (guidance rules, schedules, solvers) is documented
in :mod:`pipeline.posterior.sampler`.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.posterior.forward import ForwardModel


@dataclass(frozen=True)
class GuidanceRule:
    name: str
    loss: Literal["gaussian", "norm"]
    jacobian: Literal["network", "identity"]

    @property
    def backward(self) -> bool:
        """Whether the rule runs a backward pass through the networks."""
        return self.jacobian == "network"


RULES = {
    "tweedie": GuidanceRule("tweedie", "gaussian", "network"),
    "dps": GuidanceRule("dps", "norm", "network"),
    "projection": GuidanceRule("projection", "norm", "identity"),
}


class LoopSettings(Protocol):
    """What the step loop reads from its config (``SamplerConfig`` and :class:`StepConfig` both fit)."""

    rule: str
    steps: int
    lambda_x: float
    kappa_n: float
    schedule: str
    solver: str
    eta: float
    data_var_x: float
    data_var_n: float
    time_power: float
    clip_denoised: bool


@dataclass(frozen=True)
class StepConfig:
    """A plain :class:`LoopSettings` with ``SamplerConfig``'s defaults (unvalidated; for torch-only code)."""

    rule: str = "dps"
    steps: int = 50
    lambda_x: float = 20.0
    kappa_n: float = 20.0
    schedule: str = "constant"
    solver: str = "ddim"
    eta: float = 1.0
    data_var_x: float = 1.0
    data_var_n: float = 1.0
    time_power: float = 1.0
    clip_denoised: bool = True


class Noise:
    """Standard normal draws: one generator per sample (batch-independent) or one for the batch."""

    def __init__(self, seeds: Sequence[int] | None, generator: torch.Generator | None, device: torch.device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if seeds is not None else None
        self.generator = generator
        self.device = device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.gens is None:
            return torch.randn(shape, generator=self.generator).to(self.device)
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.gens]).to(self.device)


def _weight(schedule: str, sde: VPSDE, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    if schedule == "constant":
        return torch.ones_like(t)
    if schedule == "sde":
        return sde.beta(t) * dt
    if schedule == "pigdm":
        return sde.alpha(t)
    sig2 = (sde.sigma(t) / sde.alpha(t)) ** 2
    return sig2 / (1 + sig2)


def _posterior_var01(sde: VPSDE, t: torch.Tensor, v0: float) -> torch.Tensor:
    """Var[x_0 | x_t] for N(., v0) data, converted from network units to [0, 1] units."""
    sig2 = (sde.sigma(t) / sde.alpha(t)) ** 2
    return v0 * sig2 / (v0 + sig2) / 4.0


def _to01(z: torch.Tensor) -> torch.Tensor:
    return (z + 1.0) / 2.0


Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guidance(rule: GuidanceRule, x_model: Net, n_model: Net, sde: VPSDE, forward: ForwardModel,
             y: torch.Tensor, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
             cfg: LoopSettings) -> tuple[torch.Tensor, ...]:
    """One evaluation of both priors and the data-consistency gradients.

    Returns ``(e_x, e_n, grad_x, grad_n, r)``; the gradients are of the per-sample loss ``L``
    with respect to ``x_t`` and ``n_t``.
    """
    a = _bcast(sde.alpha(t), x)
    s = _bcast(sde.sigma(t), x)

    def loss(x0: torch.Tensor, n0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = y - forward.apply(_to01(x0), _to01(n0))
        sq = r.pow(2).flatten(1).sum(1)
        if rule.loss == "norm":
            return torch.sqrt(sq + 1e-12), r
        sigma2 = (forward.sigma_y**2 + forward.coef_x**2 * _posterior_var01(sde, t, cfg.data_var_x)
                  + forward.coef_n**2 * _posterior_var01(sde, t, cfg.data_var_n))
        return sq / (2 * sigma2), r

    if rule.jacobian == "network":
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ng = n.detach().requires_grad_(True)
            ex, en = x_model(xg, t), n_model(ng, t)
            per_sample, r = loss((xg - s * ex) / a, (ng - s * en) / a)
            # per-sample losses are independent, so the gradient of their sum is each one's gradient
            gx, gn = torch.autograd.grad(per_sample.sum(), [xg, ng])
        return ex.detach(), en.detach(), gx, gn, r.detach()
    with torch.no_grad():
        ex, en = x_model(x, t), n_model(n, t)
    with torch.enable_grad():
        x0 = ((x - s * ex) / a).requires_grad_(True)
        n0 = ((n - s * en) / a).requires_grad_(True)
        per_sample, r = loss(x0, n0)
        g0x, g0n = torch.autograd.grad(per_sample.sum(), [x0, n0])
    return ex, en, g0x / a, g0n / a, r.detach()


def ddim_step(sde: VPSDE, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              eta: float, noise: Noise, clip: bool = False) -> torch.Tensor:
    """DDIM (Song et al., 2021) from ``t`` to ``t_next`` with stochasticity ``eta``.

    ``clip``: Tweedie's estimate ``x0`` is clipped to the data range [-1, 1] and the noise estimate
    recomputed to match (``e = (x - a x0) / s``), as DDPM's ``clip_denoised``: an estimate that the
    guidance has pushed out of range cannot carry the trajectory further away."""
    a, s = sde.alpha(t), sde.sigma(t)
    a2, s2 = sde.alpha(t_next), sde.sigma(t_next)
    x0 = (x - s * e) / a
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        e = (x - a * x0) / s
    c = eta * torch.sqrt((s2 / s) ** 2 * (1 - (a / a2) ** 2)).clamp_min(0) if eta > 0 else torch.zeros(())
    out = a2 * x0 + torch.sqrt((s2**2 - c**2).clamp_min(0)) * e
    return out + c * noise.randn(tuple(x.shape)) if eta > 0 else out


Guide = Callable[..., tuple[torch.Tensor, ...]]


@torch.no_grad()
def run_steps(x_model: Net, n_model: Net, sde: VPSDE, y: torch.Tensor, forward: ForwardModel, cfg: LoopSettings,
              noise: Noise, guide: Guide = guidance,
              callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint sampler's ``cfg.steps`` steps from ``x, n ~ N(0, I)``; returns the guided Tweedie
    estimates ``(x, n)`` of the last evaluation, in network units ([-1, 1])."""
    rule = RULES[cfg.rule]
    device = y.device
    shape = tuple(y.shape)
    x = noise.randn(shape)
    n = noise.randn(shape)
    # `steps` evaluations at `steps` times from 1 down to eps; the last one's guided Tweedie estimate is
    # the result, so the sampler makes exactly `steps` network evaluations per prior
    ts = sde.timesteps(cfg.steps - 1, device=device, power=cfg.time_power)
    for i in range(cfg.steps):
        t = ts[i].expand(shape[0])
        dt = ts[i] - ts[i + 1] if i + 1 < cfg.steps else (ts[i - 1] - ts[i] if i > 0 else ts[i] - sde.eps)
        ex, en, gx, gn, _ = guide(rule, x_model, n_model, sde, forward, y, x, n, t, cfg)
        w = _bcast(_weight(cfg.schedule, sde, t, dt), x)
        if i + 1 == cfg.steps:
            a, s = _bcast(sde.alpha(t), x), _bcast(sde.sigma(t), x)
            x = (x - s * ex - cfg.lambda_x * w * gx) / a
            n = (n - s * en - cfg.kappa_n * w * gn) / a
        elif cfg.solver == "ddim":
            clip = cfg.clip_denoised
            x = ddim_step(sde, x, ex, ts[i], ts[i + 1], cfg.eta, noise, clip) - cfg.lambda_x * w * gx
            n = ddim_step(sde, n, en, ts[i], ts[i + 1], cfg.eta, noise, clip) - cfg.kappa_n * w * gn
        else:
            s = _bcast(sde.sigma(t), x)
            x = sde.reverse_step(x, t, dt, -ex / s, noise.randn(shape)) - cfg.lambda_x * w * gx
            n = sde.reverse_step(n, t, dt, -en / s, noise.randn(shape)) - cfg.kappa_n * w * gn
        if callback is not None:
            callback(i, x, n)
    return x, n


def project(forward: ForwardModel, y: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move ``(x, n)`` the least distance (``||dx||^2 + ||dn||^2``) that explains the residual of ``y``.

    With read-out noise, only the part of the residual above ``sigma_y`` is removed: per sample the
    correction is shrunk by ``max(0, 1 - sigma_y / rms(r))``, leaving a residual of RMS ``sigma_y``.
    """
    r = y - forward.apply(x, n)
    if forward.sigma_y > 0:
        rms = r.pow(2).flatten(1).mean(1).sqrt()
        r = r * _bcast((1 - forward.sigma_y / rms.clamp_min(1e-20)).clamp(0, 1), r)
    c = forward.coef_x**2 + forward.coef_n**2
    return x + forward.coef_x / c * r, n + forward.coef_n / c * r


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
                       device: torch.device | str, cfg: LoopSettings, batches: tuple[int, int] = (2, 6),
                       ) -> tuple[float, float]:
    """``(per_sample, fixed)`` CUDA bytes of one sampler step (both networks, their vector-Jacobian
    products, the update): the step's peak above what was allocated before it, at two batch sizes (each
    measured on its second call), fitted as ``fixed + B per_sample``. The models must already be wrapped
    (:meth:`Runtime.wrap`), preferably without compiling: eager memory is the larger, so the safer, figure."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measuring step memory needs a CUDA device, got {device}")
    rule = RULES[cfg.rule]
    peaks = []
    for b in batches:
        y = torch.rand(b, *shape, device=device)
        x, n = torch.randn_like(y), torch.randn_like(y)
        t = torch.full((b,), 0.5, device=device)
        # a first call at this shape does any one-off work (cuDNN autotuning and its workspaces) unmeasured
        guidance(rule, x_model, n_model, sde, forward, y, x, n, t, cfg)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = guidance(rule, x_model, n_model, sde, forward, y, x, n, t, cfg)
        x = x - out[2]  # the update's temporaries
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del out, x, n, y
    (b0, b1), (p0, p1) = batches, peaks
    per_sample = (p1 - p0) / (b1 - b0)
    if per_sample <= 0:  # allocator caching blurred the difference: charge the whole peak per sample
        return p1 / b1, 0.0
    return per_sample, max(0.0, p0 - b0 * per_sample)


def auto_batch_size(x_model: Net, n_model: Net, sde: VPSDE, forward: ForwardModel, shape: Sequence[int],
                    device: torch.device | str, cfg: LoopSettings, default: int = 32, n_samples: int = 1,
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
        per_sample_bytes, fixed_bytes = measure_step_bytes(x_model, n_model, sde, forward, shape, device, cfg)
    rows = batch_from_memory(free_bytes, per_sample_bytes, fixed_bytes, margin=margin, cap=cap)
    return max(1, rows // max(1, n_samples))
