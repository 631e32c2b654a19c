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

from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.diffusion.nets import NetConfig, UNet
from pipeline.diffusion.tiles import Tiling, tiled
from pipeline.diffusion.train import PatchPool, Trainer, TrainSettings, draw_images
from pipeline.diffusion.unet import count_parameters
from pipeline.forward import FORWARD_MODELS, ForwardModel, make_forward

TASK = "supervised"
WEIGHT_RANGES: dict[str, tuple[float, float]] = {"blend": (0.2, 0.8), "composite": (0.5, 1.0)}
TILE_OVERLAP = 8


@dataclass(frozen=True)
class Draw:
    """How one source's training images are drawn (:func:`pipeline.diffusion.train.draw_images`): its prior's own
    augmentation settings and the network's channels."""

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


def draw_pairs(clean: torch.Tensor | PatchPool, noise: torch.Tensor | PatchPool, n: int, g: torch.Generator,
               clean_draw: Draw, noise_draw: Draw, forward: str,
               weight_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` pairs, all drawn from ``g`` in this order: clean images, noise images, one weight each from
    ``weight_range``; returns ``(observations, clean images)`` in network units and the weights."""
    x0 = draw_images(clean, n, g, **asdict(clean_draw))
    n0 = draw_images(noise, n, g, **asdict(noise_draw))
    lo, hi = weight_range
    w = lo + (hi - lo) * torch.rand(n, generator=g, device=x0.device)
    return synthesize((x0 + 1) / 2, (n0 + 1) / 2, forward, w) * 2 - 1, x0, w


class SupervisedTrainer(Trainer):
    """:class:`Trainer` for the supervised network: a batch is a pair ``(observation, clean)`` drawn by
    :meth:`draw_batch` from ``(clean images, noise images)``; the loss is the mean squared error of the network's
    output (time 0) against the clean image, in network units ([-1, 1])."""

    def __init__(self, settings: TrainSettings, noise: Draw, forward: str,
                 weight_range: tuple[float, float], device: torch.device | str = "cpu"):
        super().__init__(settings, device)
        self.clean_draw = Draw(settings.hflip, settings.shift, settings.grey_to_rgb, settings.net.channels)
        self.noise_draw = noise
        self.forward = forward
        self.weight_range = weight_range

    def draw_batch(self, data: tuple[torch.Tensor | PatchPool, torch.Tensor | PatchPool]  # type: ignore[override]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        y, x0, _ = draw_pairs(*data, self.settings.batch_size, self.generator, self.clean_draw, self.noise_draw,
                              self.forward, self.weight_range)
        return y, x0

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:  # type: ignore[override]
        return self._optimise(lambda net: pair_loss(net, *batch))


def pair_loss(net: torch.nn.Module, y: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``net(y, 0)`` against ``x0`` (network units)."""
    return (net(y, torch.zeros(y.shape[0], device=y.device)) - x0).pow(2).mean()


def is_supervised(meta: dict[str, Any]) -> bool:
    """Whether a model folder's ``meta`` is a supervised network's."""
    return meta.get("task") == TASK


@torch.no_grad()
def restore(model: torch.nn.Module, y01: torch.Tensor, batch: int = 256,
            overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """The network's clean image for observations ``y01`` ``(B, C, H, W)`` in [0, 1], of any size: tiles of the
    network's size overlapping by :data:`TILE_OVERLAP`, blended; [0, 1]."""
    size = model.config.image_size
    h, w = y01.shape[-2:]
    tiling = Tiling(h, w, size, 0 if (h, w) == (size, size) else overlap)
    t = torch.zeros(y01.shape[0], device=y01.device)
    out = tiled(model, y01 * 2 - 1, t, tiling, batch)
    return ((out + 1) / 2).clamp(0.0, 1.0)


# --- the fast path and the router ------------------------------------------------------------------------

ROUTE_TIMES = (0.05, 0.1, 0.2, 0.4)
"""The diffusion times at which the priors score the network's answer (:func:`prior_losses`): low noise levels,
where a prior tells detail it knows from detail it does not."""


@torch.no_grad()
def prior_losses(model: torch.nn.Module, sde: Any, ids: list[str], z01: torch.Tensor, tile_batch: int = 64,
                 overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """Per image, a prior's denoising loss on ``z01`` ([0, 1]) at :data:`ROUTE_TIMES`, with noise drawn from the
    image's id (so an image's figure never depends on its batch); network units, lower is more likely. Images
    larger than the prior are scored in tiles."""
    from pipeline.posterior.sampler import seed_for

    z = z01 * 2 - 1
    size = model.config.image_size
    h, w = z.shape[-2:]
    tiling = Tiling(h, w, size, 0 if (h, w) == (size, size) else overlap)
    out = torch.zeros(z.shape[0], device=z.device)
    for j, t_val in enumerate(ROUTE_TIMES):
        e = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed_for(i, 0, 1000 + j)))
                         for i in ids]).to(z.device)
        t = torch.full((z.shape[0],), t_val, device=z.device)
        a, s = sde.alpha(t).view(-1, 1, 1, 1), sde.sigma(t).view(-1, 1, 1, 1)
        pred = tiled(model, a * z + s * e, t, tiling, tile_batch)
        out += (pred - e).pow(2).flatten(1).mean(1)
    return out / len(ROUTE_TIMES)


WEIGHT_TIME = 0.1
"""The diffusion time at which the noise prior scores each candidate weight's noise (:func:`estimate_weight`)."""
WEIGHT_COARSE = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""The weights first tried (0.05 to 0.95); then every :data:`WEIGHT_FINE` within 0.04 of the best of them."""
WEIGHT_FINE = 0.01
WEIGHT_TILES = 16
"""At most this many of an image's tiles (spread evenly over it) are scored: the cost does not grow with its size."""


@torch.no_grad()
def estimate_weight(n_model: torch.nn.Module, sde: Any, ids: list[str], y01: torch.Tensor, x01: torch.Tensor,
                    forward: ForwardModel, tile_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the weight of ``forward`` (an :data:`~pipeline.posterior.estimate.ESTIMABLE` model, the blend's
    alpha) whose noise the noise prior finds most likely, given the image ``x01`` (the supervised network's answer)
    and the observation ``y01`` (both ``(B, C, H, W)`` in [0, 1]); and the noise prior's evaluations per image (B,).

    Each candidate weight ``w`` implies a noise, ``forward.explain(y, x)`` with that weight; the noise prior's
    denoising loss on it at :data:`WEIGHT_TIME` (the same seeded noise for every candidate, drawn from the image's
    id) is lowest near the true weight: a smaller weight over-amplifies ``y - x`` beyond the noise's range, a
    larger one leaves a faded copy of the image in the noise. The candidates are :data:`WEIGHT_COARSE`, then every
    :data:`WEIGHT_FINE` around the best of them, within :data:`~pipeline.posterior.estimate.BOUNDS`; an image
    larger than the prior is scored on at most :data:`WEIGHT_TILES` of its tiles, each inside the image (an image
    smaller than a tile is reflected to fill it). The estimate depends on the image's id, size and pixels only."""
    from pipeline.posterior.estimate import BOUNDS
    from pipeline.posterior.sampler import seed_for

    size = n_model.config.image_size
    b, _, h, w = y01.shape
    tiling = Tiling(h, w, size, 0)  # its reflection fills a tile over an image smaller than one

    def starts(side: int) -> list[int]:  # tiles side by side, the last one moved in to end at the border
        return sorted({*range(0, side - size + 1, size), side - size}) if side >= size else [0]

    origins = [(a, c) for a in starts(h) for c in starts(w)]
    if len(origins) > WEIGHT_TILES:
        origins = [origins[round(i * (len(origins) - 1) / (WEIGHT_TILES - 1))] for i in range(WEIGHT_TILES)]
    t_one = torch.zeros(b, device=y01.device)
    yt, _ = tiling.gather(y01, origins, t_one)
    xt, _ = tiling.gather(x01, origins, t_one)
    n_tiles = len(origins)
    a_t, s_t = float(sde.alpha(torch.tensor(WEIGHT_TIME))), float(sde.sigma(torch.tensor(WEIGHT_TIME)))
    out = torch.empty(b)
    lo, hi = BOUNDS
    fine = [round(k * WEIGHT_FINE, 2) for k in range(-4, 5) if k]
    tried = torch.zeros(b, dtype=torch.long)
    for k in range(b):
        yk, xk = yt[k * n_tiles:(k + 1) * n_tiles], xt[k * n_tiles:(k + 1) * n_tiles]
        g = torch.Generator().manual_seed(seed_for(ids[k], 0, 2000))
        e = torch.randn((n_tiles, forward.noise_channels(yk.shape[1]), size, size), generator=g).to(yk.device)
        scores = dict(zip(WEIGHT_COARSE, _weight_losses(n_model, forward, list(WEIGHT_COARSE), yk, xk, e, a_t, s_t,
                                                        tile_batch), strict=True))
        best = min(scores, key=scores.__getitem__)
        around = [c for c in (round(best + d, 2) for d in fine) if lo <= c <= hi and c not in scores]
        if around:
            scores.update(zip(around, _weight_losses(n_model, forward, around, yk, xk, e, a_t, s_t, tile_batch),
                              strict=True))
        tried[k] = len(scores)
        out[k] = min(scores, key=scores.__getitem__)
    return out, tried


def _weight_losses(n_model: torch.nn.Module, forward: ForwardModel, cands: list[float], y: torch.Tensor,
                   x: torch.Tensor, e: torch.Tensor, a_t: float, s_t: float, tile_batch: int) -> list[float]:
    """:func:`estimate_weight`'s score of each candidate weight: the noise prior's denoising loss, at
    :data:`WEIGHT_TIME` with the noise ``e``, on the noise that each implies over one image's tiles ``y``, ``x``."""
    m, n_tiles = len(cands), y.shape[0]
    fm = make_forward(forward.name, m * n_tiles,
                      **{type(forward).weight: torch.tensor(cands).repeat_interleave(n_tiles)})
    z = fm.explain(y.repeat(m, 1, 1, 1), x.repeat(m, 1, 1, 1)) * 2 - 1
    ee = e.repeat(m, 1, 1, 1)
    zt = a_t * z + s_t * ee
    t = torch.full((zt.shape[0],), WEIGHT_TIME, device=zt.device)
    pred = torch.cat([n_model(zt[i:i + tile_batch], t[i:i + tile_batch]) for i in range(0, zt.shape[0], tile_batch)])
    return (pred - ee).pow(2).flatten(1).mean(1).view(m, n_tiles).mean(1).tolist()


@dataclass(frozen=True)
class RouteCalibration:
    """How unusual the network's answers are on validation pairs of its training kind: the mean and std of the
    image prior's and the noise prior's loss (:func:`prior_losses`), and quantiles of the score
    (:meth:`score`). Held in the supervised model's card (``meta.route``)."""

    image_prior: str
    noise_prior: str
    x_mean: float
    x_std: float
    n_mean: float
    n_std: float
    quantiles: dict[str, float]
    n_pairs: int

    def score(self, loss_x: torch.Tensor, loss_n: torch.Tensor) -> torch.Tensor:
        """The larger of the two losses' z-scores against validation: high where either prior finds its part of
        the answer unusual."""
        return torch.maximum((loss_x - self.x_mean) / self.x_std, (loss_n - self.n_mean) / self.n_std)

    def threshold(self, quantile: float) -> float:
        """The score above which an image is routed: the validation score's ``quantile`` (routes about
        ``1 - quantile`` of images like the validation pairs)."""
        key = f"{quantile:g}"
        if key not in self.quantiles:
            raise ValueError(f"sampler.route_quantile={quantile:g}: the network's card is calibrated at "
                             f"{', '.join(self.quantiles)}")
        return self.quantiles[key]


ROUTE_QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.99)


def calibrate(network: torch.nn.Module, x_model: torch.nn.Module, n_model: torch.nn.Module, sde: Any,
              y01: torch.Tensor, forward: ForwardModel, names: tuple[str, str],
              ids: list[str]) -> RouteCalibration:
    """A :class:`RouteCalibration` from validation observations ``y01`` (pairs of the network's training kind,
    never its training images) under ``forward``, for the priors ``names`` (image, noise)."""
    x = restore(network, y01)
    lx = prior_losses(x_model, sde, ids, x)
    ln = prior_losses(n_model, sde, ids, forward.explain(y01, x))
    cal = RouteCalibration(names[0], names[1], float(lx.mean()), float(lx.std()), float(ln.mean()),
                           float(ln.std()), {}, len(ids))
    s = cal.score(lx, ln)
    q = {f"{p:g}": float(torch.quantile(s, p)) for p in ROUTE_QUANTILES}
    return RouteCalibration(**{**cal.__dict__, "quantiles": q})


class FastDenoiser:
    """``sampler.path: fast`` and ``routed``: the supervised network on every image (one evaluation); ``routed``
    also scores each answer with both priors (:func:`prior_losses`, :meth:`RouteCalibration.score`) and sends the
    images scoring above the calibrated threshold, and those whose weight is to be estimated, to the joint sampler
    (``joint``, a :class:`~pipeline.posterior.denoise.Denoiser`). On ``fast``, a row whose weight is to be estimated
    gets the weight the noise prior finds most likely for the network's answer (:func:`estimate_weight`; ``noise``:
    the noise prior and its SDE). Called as the joint denoiser is; the output's
    ``path`` says, per image, which path cleaned it. A row the network cleaned has no ``residual`` or ``spread``
    (NaN): its noise estimate explains the observation by construction, and it is one answer, not samples."""

    def __init__(self, network: torch.nn.Module, joint: Any = None, calibration: RouteCalibration | None = None,
                 quantile: float = 0.9, tile_batch: int = 256, overlap: int = TILE_OVERLAP,
                 noise: tuple[torch.nn.Module, Any] | None = None):
        self.network, self.joint, self.calibration, self.noise = network, joint, calibration, noise
        self.threshold = None if calibration is None else calibration.threshold(quantile)
        self.tile_batch, self.overlap = tile_batch, overlap

    def __call__(self, ids: list[str], y: torch.Tensor, forward: ForwardModel,
                 estimate: torch.Tensor | None = None) -> Any:
        import time

        from pipeline import metrics
        from pipeline.posterior.denoise import DenoiseOutput

        t0 = time.perf_counter()
        b = y.shape[0]
        estimate = torch.zeros(b, dtype=torch.bool) if estimate is None else estimate.cpu()
        if self.joint is None and self.noise is None and bool(estimate.any()):
            raise ValueError("the supervised network does not estimate the forward weight: give forward.alpha or an "
                             "alpha column, or use sampler.path=routed or joint")
        x = restore(self.network, y, self.tile_batch)
        nfe = torch.ones(b, dtype=torch.long)
        alpha_hat = None
        if self.joint is None and bool(estimate.any()):  # fast: the noise prior picks the weight of these rows
            rows = torch.nonzero(estimate).flatten()
            hats, tried = estimate_weight(*self.noise, [ids[k] for k in rows.tolist()], y[rows], x[rows],
                                          forward.take(rows), self.tile_batch)
            name = type(forward).weight
            weights = getattr(forward, name).clone().float()
            weights[rows.to(weights.device)] = hats.to(weights.device)
            forward = forward.with_params(**{name: weights})
            alpha_hat, nfe[rows] = weights.cpu(), nfe[rows] + tried
        n = forward.explain(y, x)
        path = ["fast"] * b
        score = torch.full((b,), float("nan"))
        nan = torch.full((b,), float("nan"), device=y.device)
        residual, spread, uncertainty = nan.clone(), nan.clone(), None
        if self.joint is not None and self.calibration is not None:
            j = self.joint
            lx = prior_losses(j.x_model, j.sde, ids, x, self.tile_batch, self.overlap)
            ln = prior_losses(j.n_model, j.sde, ids, n, self.tile_batch, self.overlap)
            score = self.calibration.score(lx, ln).cpu()
            nfe += 2 * len(ROUTE_TIMES)
            send = [k for k in range(b) if score[k] > self.threshold or estimate[k]]
            if send:
                est = estimate[send] if bool(estimate[send].any()) else None
                out = j([ids[k] for k in send], y[send], forward.take(send), est)
                x, n = x.clone(), n.clone()
                x[send], n[send], residual[send], spread[send] = (out.denoised, out.noise_estimate,
                                                                  out.residual.to(y.device), out.spread.to(y.device))
                if out.uncertainty is not None:
                    uncertainty = torch.zeros_like(x)
                    uncertainty[send] = out.uncertainty
                if out.alpha_hat is not None:  # the weight each sent row was cleaned with; the others' is given
                    alpha_hat = getattr(forward, type(forward).weight).clone().float().cpu()
                    alpha_hat[send] = out.alpha_hat.cpu().float()
                for k in send:
                    path[k] = "joint"
                    nfe[k] += out.nfe
        return DenoiseOutput(
            denoised=x, noise_estimate=n, uncertainty=uncertainty, residual=residual, spread=spread,
            removed_energy=metrics.removed_energy(y, forward.image_part(x, n), 1.0), nfe=int(nfe.max()),
            backward=any(p == "joint" for p in path), seconds=(time.perf_counter() - t0) / max(b, 1),
            alpha_hat=alpha_hat, path=path, route_score=score, nfe_per_image=nfe.tolist())
