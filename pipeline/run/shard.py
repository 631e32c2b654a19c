"""A shard's work: ``read -> decode -> sample -> encode -> write``, then its completion marker.

Each stage is a function of its own: :func:`read` (the shard's columns, or error rows saying why it has
none), :func:`pipeline.run.rows.decode_rows` (rows the priors take, or rejected), :func:`sample` (the joint
posterior sampler in batches, with the metrics), :func:`pipeline.run.outputs.encode` (the three tables) and
:func:`pipeline.run.outputs.write`. :func:`clean_shard` runs them in order and writes the marker last, in
this process or inside a Ray actor; :func:`give_up` records a shard that cannot be cleaned.

A :class:`ShardCleaner` holds what the work needs across shards: both priors, loaded once from their pinned
URIs and checked against their fingerprints (:func:`pipeline.run.models.load_pinned`), the sampler's runtime
and the batch size.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.config import CleanConfig
from pipeline.data.accounting import PlannedShard, mark_done
from pipeline.data.embedded import grey_of
from pipeline.data.shards import read_table
from pipeline.data.validate import error_row
from pipeline.forward import FORWARD_MODELS, make_forward
from pipeline.posterior.core import Runtime, auto_batch_size
from pipeline.posterior.denoise import Denoiser, truth_metrics
from pipeline.posterior.estimate import INITIAL
from pipeline.posterior.sampler import SOLVERS
from pipeline.run.models import check_pair, load_pinned
from pipeline.run.outputs import ShardResult, encode, write
from pipeline.run.preflight import resolve_device
from pipeline.run.recipe import PinnedRecipe
from pipeline.run.rows import Row, decode_rows

if TYPE_CHECKING:
    from pipeline.run.run import Run


class ShardCleaner:
    """Both priors (the run's pinned versions, loaded once), the runtime and the batch size."""

    def __init__(self, cfg: CleanConfig, pinned: PinnedRecipe):
        self.cfg, self.pinned = cfg, pinned
        self.device = resolve_device(cfg.device)
        self.x_model, self.sde, _ = load_pinned(pinned.image, self.device)
        self.n_model, self.n_sde, _ = load_pinned(pinned.noise, self.device)
        check_pair(self.x_model.config, self.sde, self.n_model.config, self.n_sde, cfg.forward.name)
        self.shape = (self.x_model.config.channels, self.x_model.config.image_size, self.x_model.config.image_size)
        # images keep their size; another channel count is converted to the priors' (or refused) by policy,
        # except grey for RGB priors, which is cleaned as R = G = B and goes back to grey (pipeline.run.rows)
        self.policy = cfg.policy.model_copy(update={"size": None, "channels": 1 if self.shape[0] == 1 else None})
        # the sampler differentiates with respect to its inputs only: no weight gradients to track
        self.x_model.requires_grad_(False)
        self.n_model.requires_grad_(False)
        self.settings = cfg.sampler.settings()  # weights already resolved on the driver (pipeline.run.recipe)
        self.runtime = cfg.gpu.runtime(self.device)
        if torch.device(self.device).type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        self.batch_size = self._batch_size()
        tile_pixels = self.shape[1] * self.shape[2]
        self.batch_pixels = cfg.batch_pixels or self.batch_size * tile_pixels
        self.tile_batch = max(1, self.batch_pixels // tile_pixels)
        # sampler.path fast / routed: the supervised network, pinned like the priors
        self.network, self.calibration = None, None
        if pinned.supervised is not None:
            from pipeline.posterior.supervised import RouteCalibration

            self.network, _, meta = load_pinned(pinned.supervised, self.device)
            self.network.requires_grad_(False)
            if self.settings.path == "routed":
                self.calibration = RouteCalibration(**meta["route"])

    def denoiser(self) -> Any:
        """What cleans a batch: the joint sampler (:class:`Denoiser`), or under ``sampler.path`` fast / routed the
        supervised network, routed to the joint sampler where its answer is unusual
        (:class:`pipeline.posterior.supervised.FastDenoiser`)."""
        joint = Denoiser(self.x_model, self.n_model, self.sde, self.settings, self.runtime,
                         tile_batch=self.tile_batch)
        if self.network is None:
            return joint
        from pipeline.posterior.supervised import FastDenoiser

        routed = self.settings.path == "routed"
        return FastDenoiser(self.network, joint if routed else None, self.calibration, self.settings.route_quantile,
                            tile_batch=self.tile_batch, overlap=self.settings.tile_overlap,
                            noise=None if routed else (self.n_model, self.n_sde))

    def _batch_size(self) -> int:
        """``cfg.batch_size``, or for ``auto`` the batch that fills ``gpu.memory_margin`` of the free GPU
        memory (measured with the networks as they will run, less compilation; 32 on a CPU)."""
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        probe = Runtime(self.runtime.precision, self.runtime.channels_last, compile=False)
        return auto_batch_size(probe.wrap(self.x_model, self.device), probe.wrap(self.n_model, self.device),
                               self.sde, make_forward(self.cfg.forward.name, 1), self.shape, self.device,
                               self.settings, default=32,
                               n_samples=self.settings.n_samples, margin=self.cfg.gpu.memory_margin,
                               cap=self.cfg.gpu.max_batch)


def seconds_per_megapixel(cleaner: ShardCleaner) -> float:
    """The sampler's seconds per megapixel with this cleaner, measured: one guided evaluation of a 2x2-tile image
    (the second of two calls), times the steps and posterior samples."""
    from pipeline.posterior.guidance import GuidedDenoiser

    c, tile = cleaner.shape[0], cleaner.shape[1]
    side = 2 * tile
    fwd = make_forward(cleaner.cfg.forward.name, 1)
    y = torch.rand(1, c, side, side, device=cleaner.device)
    d = GuidedDenoiser(cleaner.x_model, cleaner.n_model, cleaner.sde, fwd, y, cleaner.settings, tile,
                       cleaner.tile_batch)
    x = torch.randn_like(y)
    n = torch.randn(1, fwd.noise_channels(c), side, side, device=cleaner.device)
    t, dt = torch.full((1,), 0.5, device=cleaner.device), torch.tensor(0.02, device=cleaner.device)
    seconds = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        d(x, n, t, dt)
        if torch.device(cleaner.device).type == "cuda":
            torch.cuda.synchronize(cleaner.device)
        seconds = time.perf_counter() - t0
    return seconds * cleaner.settings.steps * cleaner.settings.n_samples / (side * side / 1e6)


def estimate_line(run: Run, cleaner: ShardCleaner, workers: int = 1, at_least_s: float = 30.0) -> str | None:
    """One line of the run's estimated time (the pending rows' megapixels, from the sizes of the first rows, times
    the measured seconds per megapixel, over ``workers``), or None for a run shorter than ``at_least_s``."""
    if not run.mean_pixels or not run.pending_rows or getattr(SOLVERS[cleaner.settings.solver], "finishes", False):
        return None  # the paper preset's solver runs its own guidance, at the priors' size only
    if cleaner.settings.path == "fast":
        return None  # one network evaluation per image (and at most 27 of the noise prior): seconds
    routed = cleaner.settings.path == "routed"
    per_mp = seconds_per_megapixel(cleaner)
    mp = run.pending_rows * run.mean_pixels / 1e6
    total = mp * per_mp / max(1, workers)
    if total < at_least_s:
        return None
    took = f"{total / 3600:.1f} h" if total >= 5400 else f"{total / 60:.0f} min" if total >= 90 else f"{total:.0f} s"
    return (f"clean {run.run_id}: {'at most' if routed else 'about'} {took}"
            f"{' (if the router sent every image to the joint sampler)' if routed else ''}: "
            f"{run.pending_rows} image(s) of ~{run.mean_pixels / 1e6:.2g} MP "
            f"(the first rows' sizes) at {per_mp:.0f} s/MP ({cleaner.settings.steps} steps, measured here on "
            f"{cleaner.device}{f', over {workers} actors' if workers > 1 else ''})")


def read(run: Run, shard: PlannedShard, result: ShardResult) -> dict[str, list[Any]] | None:
    """The shard's columns; None (and its rows in ``result.errors``) when it cannot be read (one row -1) or
    lacks ``id`` or ``observation`` (each row)."""
    try:
        table = read_table(shard.uri, attempts=3)
    except Exception as exc:
        result.errors.append(error_row(run.run_id, run.dataset, shard.name, -1, None, "read",
                                       f"the shard cannot be read: {exc}"))
        return None
    missing = [c for c in ("id", "observation") if c not in table.column_names]
    if missing:
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
        for row, id_ in enumerate(ids):
            result.errors.append(error_row(run.run_id, run.dataset, shard.name, row, id_, "validate",
                                           f"the shard lacks column(s) {missing}; an observation shard needs "
                                           f"'id' and 'observation' (it has {table.column_names})"))
        return None
    return {c: table.column(c).to_pylist() for c in table.column_names}


def batches(rows: list[Row], max_images: int, max_pixels: int) -> list[list[Row]]:
    """``rows`` in batches of one image size each (in the order sizes first appear), each at most ``max_images``
    images and ``max_pixels`` pixels, but at least one image."""
    by_size: dict[tuple[int, ...], list[Row]] = {}
    for r in rows:
        by_size.setdefault(r.y.shape, []).append(r)
    out: list[list[Row]] = []
    for same in by_size.values():
        per = max(1, min(max_images, max_pixels // same[0].pixels))
        out += [same[i:i + per] for i in range(0, len(same), per)]
    return out


def _alphas(r: Row, cleaned_with: float | None) -> dict[str, float | None]:
    """The row's ``alpha`` (the weight given: forward.alpha or its alpha column; None where unknown), ``alpha_hat``
    (the weight it was cleaned with: the estimate where estimated) and ``alpha_error`` (|alpha_hat - alpha| where
    the weight was estimated and a given one is known, the truth of a corrupted dataset)."""
    given = None if math.isnan(r.alpha) else r.alpha
    hat = cleaned_with if cleaned_with is not None else given
    err = abs(hat - given) if r.estimate and hat is not None and given is not None else None
    return {"alpha": given, "alpha_hat": hat, "alpha_error": err}


def sample(cleaner: ShardCleaner, rows: list[Row], result: ShardResult, reject: Callable[[Row, str], None],
           progress: Callable[[int], None] | None = None) -> None:
    """The joint posterior sampler over ``rows``, in batches of one image size and at most ``cleaner.batch_size``
    images and ``cleaner.batch_pixels`` pixels (a batch may mix alphas: the forward model holds one row of
    parameters per image), with the metrics: the cleaned rows into ``result``, a row whose sample is not finite
    to ``reject``. Images larger than the priors are sampled in tiles (:mod:`pipeline.diffusion.tiles`)."""
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    fwd = cleaner.cfg.forward
    weight = FORWARD_MODELS[fwd.name].weight  # the parameter each row's alpha column holds (none for the sum)
    denoiser = cleaner.denoiser()
    # the paper preset: the priors' size only
    if getattr(SOLVERS[cleaner.settings.solver], "finishes", False) and cleaner.settings.path != "fast":
        size = cleaner.shape[1:]
        for r in [r for r in rows if r.y.shape[1:] != size]:
            reject(r, f"{r.y.shape[1]}x{r.y.shape[2]} pixels: the {cleaner.settings.solver} solver runs at the "
                      f"priors' size ({size[0]}x{size[1]}) only; use sampler.solver=ddim for other sizes")
        rows = [r for r in rows if r.y.shape[1:] == size]
    for batch in batches(rows, cleaner.batch_size, cleaner.batch_pixels):
        y = torch.from_numpy(np.stack([r.y for r in batch])).to(cleaner.device)
        estimate = torch.tensor([r.estimate for r in batch])
        given = [INITIAL if r.estimate else r.alpha for r in batch]  # an estimated row's weight is the sampler's
        forward = make_forward(fwd.name, len(batch), sigma_y=fwd.sigma_y,  # per row: a batch may mix weights
                               **({weight: given} if weight else {}))
        out = denoiser([r.id for r in batch], y, forward, estimate if bool(estimate.any()) else None)
        truth = _truth_metrics(batch, out.denoised, y, cleaner.device)
        finite = torch.isfinite(out.denoised.flatten(1)).all(1) & torch.isfinite(out.noise_estimate.flatten(1)).all(1)
        for k, r in enumerate(batch):
            if not finite[k]:
                reject(r, "the sampler diverged (non-finite values); lower sampler.lambda_x / sampler.kappa_n "
                          "or use more steps")
                continue
            back = grey_of if r.grey else (lambda a: a)
            denoised = back(out.denoised[k].cpu().numpy())
            if r.alpha_plane is not None:  # the input's alpha, put back (policy.alpha=keep)
                denoised = np.concatenate([denoised, r.alpha_plane])
            result.add(row=r.row, id=r.id, denoised=denoised,
                       noise_estimate=back(out.noise_estimate[k].cpu().numpy()),
                       **({"uncertainty": back(out.uncertainty[k].cpu().numpy())} if out.uncertainty is not None
                          else {}),
                       **{name: _finite_or_none(v[k]) for name, v in truth.items()},
                       residual=_finite_or_none(float(out.residual[k])),
                       spread=_finite_or_none(float(out.spread[k])),
                       removed_energy=_finite_or_none(float(out.removed_energy[k])),
                       **_alphas(r, None if out.alpha_hat is None else float(out.alpha_hat[k])),
                       path=out.path[k] if out.path else "joint",
                       route_score=None if out.route_score is None else _finite_or_none(float(out.route_score[k])),
                       seconds=out.seconds, nfe=out.nfe_per_image[k] if out.nfe_per_image else out.nfe,
                       started_at=started)
        if progress is not None:
            progress(len(batch))


def _truth_metrics(batch: list[Row], denoised: torch.Tensor, y: torch.Tensor,
                   device: str) -> dict[str, list[float | None]]:
    """PSNR/SSIM of the output and of the input against the ground truth, per row (None without it); a grey
    row is measured in grey, as it is written."""
    out: dict[str, list[float | None]] = {c: [None] * len(batch) for c in ("psnr", "ssim", "psnr_input",
                                                                           "ssim_input")}
    for grey in (False, True):
        have = [k for k, r in enumerate(batch) if r.clean is not None and r.grey == grey]
        if not have:
            continue
        clean = torch.from_numpy(np.stack([batch[k].clean for k in have])).to(device)
        x, yy = denoised[have], y[have]
        if grey:
            x, yy, clean = _grey(x), _grey(yy), _grey(clean)
        for c, v in truth_metrics(x, clean, yy).items():
            for k, val in zip(have, v.tolist()):
                out[c][k] = val
    return out


def _grey(t: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` to ``(B, 1, H, W)`` by ITU-R 601 luminance, as :func:`~pipeline.data.embedded.grey_of`."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=t.dtype, device=t.device)
    return (t * w[None, :, None, None]).sum(1, keepdim=True)


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def clean_shard(cleaner: ShardCleaner, run: Run, shard: PlannedShard, progress: Callable[[int], None] | None = None,
                duplicates: Mapping[int, str] | None = None, before_marker: Callable[[str], None] | None = None,
                worker: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``read -> decode -> sample -> encode -> write`` one source shard, then its completion marker (last).

    ``duplicates`` (row -> reason: later copies of an id, found by the run's plan across the whole run)
    defaults to the plan's entry for this shard; ``worker`` (who cleaned it: the Ray node id) goes into the
    marker. Returns its counts, ``seconds`` and its ``started``/``finished`` wall-clock times (epoch seconds,
    for throughput without start-up)."""
    t0, started = time.perf_counter(), time.time()
    duplicates = run.duplicates.get(shard.name, {}) if duplicates is None else duplicates
    result = ShardResult()

    def reject(row: int, id_: Any, stage: str, reason: str) -> None:
        result.errors.append(error_row(run.run_id, run.dataset, shard.name, row, id_, stage, reason))

    cols = read(run, shard, result)
    if cols is not None:
        rows, rejected = decode_rows(cols, cleaner.policy, cleaner.shape[0], cleaner.cfg.forward, duplicates)
        for row, id_, err in rejected:
            reject(row, id_, err.stage, err.reason)
        sample(cleaner, rows, result, lambda r, why: reject(r.row, r.id, "sample", why), progress)
    _write(run, shard.name, result)
    if before_marker is not None:
        before_marker(shard.name)
    info = {"run_id": run.run_id, "cleaned": result.n_cleaned, "errors": len(result.errors),
            "input_size": shard.size, "input_version": shard.version, "pid": os.getpid(), **(worker or {})}
    mark_done(run.run_uri, shard.name, info)
    return {"shard": shard.name, "cleaned": info["cleaned"], "errors": info["errors"],
            "seconds": time.perf_counter() - t0, "started": started, "finished": time.time()}


def give_up(run: Run, shard: PlannedShard, reason: str) -> dict[str, Any]:
    """Give up on a shard: every row of it to the errors table (one row -1 if it cannot be read), no
    cleaned or metrics file (an earlier attempt's are removed), and its marker, so the run completes and
    the accounting holds. Needs no model, so it works even when loading the models is what kills the worker."""
    from pipeline.data.shards import ShardError

    result = ShardResult()
    try:
        ids = read_table(shard.uri, ["id"], attempts=3).column("id").to_pylist()
    except ShardError:
        ids = None
    for row, id_ in ([(-1, None)] if ids is None else enumerate(ids)):
        result.errors.append(error_row(run.run_id, run.dataset, shard.name, row, id_, "sample", reason))
    _write(run, shard.name, result)
    mark_done(run.run_uri, shard.name, {"run_id": run.run_id, "cleaned": 0, "errors": len(result.errors),
                                        "input_size": shard.size, "input_version": shard.version, "failed": reason})
    now = time.time()
    return {"shard": shard.name, "cleaned": 0, "errors": len(result.errors), "seconds": 0.0, "started": now,
            "finished": now}


def _write(run: Run, shard: str, result: ShardResult) -> None:
    sampler = json.dumps(run.cfg.sampler.model_dump(), sort_keys=True)
    tables = encode(result, run.run_id, run.dataset, shard, run.pinned.model_ids, sampler,
                    uncertainty=run.cfg.sampler.n_samples > 1)
    write(run.run_uri, run.run_id, shard, tables)
