"""``jointdiff bench large``: held-out photos at their own size under text overlays and stripes.

The photos are the ``natural`` test split (:data:`pipeline.data.embedded.NATURAL_PHOTOS`: astronaut and coffee in
RGB, camera and coins grey), never seen by a prior, at native resolution: the full run cuts each to at most
``crop`` pixels a side (centre) so that it fits in 90 minutes on 2 CPU cores; ``--quick`` one 128x192 crop of
astronaut at 4 steps. Three scenarios:

* ``text``: an RGBA layer of random words (the training font families, test seeds:
  :func:`pipeline.data.text.text_layer`) composited with ``a`` = :data:`TEXT_A`; priors ``natural`` + ``text``;
* ``stripes``: grey stripes blended with alpha :data:`STRIPES_ALPHA`; priors ``natural`` + ``stripes-rgb``;
* ``unknown-alpha``: the same stripes, each photo blended with its own alpha drawn uniformly from
  :data:`UNKNOWN_ALPHA` and hidden from the sampler. Its sampler rows are ``joint-oracle`` (each photo's own alpha),
  ``joint-auto`` (``forward.alpha: auto``) and ``joint-fixed`` (0.5, what a user would guess), with the weights a
  user's run takes (the tuned table's for ``natural`` + ``stripes-rgb``, not searched again), each with the median
  and mean ``|alpha_hat - alpha|`` of the weight it cleaned with; no ``gaussian`` row.

Grey photos are noised in grey (a text layer's colour by luminance), cleaned by the RGB priors as R = G = B and
measured in grey, as a run does. Rows per scenario: the observation, NLM, TV, BM3D (when installed), ``inpaint``
(what a practitioner tries first for text: a mask where the observation departs from its median filter by more
than a threshold, dilated, filled by :func:`skimage.restoration.inpaint_biharmonic`), each tuned on the validation
photos (rocket, clock); ``gaussian`` (the joint sampler with the noise prior replaced by a Gaussian fitted to the
noise's training patches) and ``joint`` (the shipped priors); the samplers' weights are picked from
:data:`JOINT_GRID` on 64x96 centre crops of the validation photos (``--quick``: the first pair, unsearched). Each
scenario has its own guidance rule (:data:`SCENARIOS`: ``projection`` without the final projection for the text
composite, ``dps`` for the stripes' blend; ``--rules`` gives every scenario one).

Figures per row: PSNR and SSIM (mean and median over the photos), seconds per megapixel, the peak RSS of the
process while the method ran, and for the samplers the *seam ratio*: the mean absolute difference between
neighbouring pixels across the borders of the last step's tiles over the same inside the tiles (1: no seam).
The *tiling overhead* (:func:`tiling_overhead`): seconds per tile evaluation of one 160x160 image cleaned in tiles
over seconds per image evaluation of as many untiled 32x32 images, per rule (6 steps, best of 3; ``--quick``: 2
steps, once). ``--memory`` cleans a synthetic 4096x4096 RGB image at ``sampler.steps=2`` in a child process and
reports its peak RSS (memory does not depend on steps) and the full time extrapolated from the measured seconds per
megapixel.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics
from pipeline.bench.quality import ALPHA_ROWS, alpha_error_lines, alpha_error_suffix, hidden_alphas
from pipeline.data.corrupt import layer_for
from pipeline.data.embedded import STRIPES_SPLITS, TEXT_SPLITS, grey_of, load_embedded, natural_photos, stripe
from pipeline.data.text import HELD_OUT
from pipeline.forward import FORWARD_MODELS, make_forward
from pipeline.posterior.baselines import BASELINES, bm3d_available
from pipeline.posterior.denoise import Denoiser
from pipeline.posterior.guidance import RULES, GuidedDenoiser
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import SamplerSettings
from pipeline.posterior.supervised import estimate_weight, restore
from pipeline.posterior.tuned import TABLE, resolve_weights
from pipeline.posterior.tuned import entry as tuned_entry
from pipeline.posterior.tuned import record as tuned_record
from pipeline.priors import supervised_for

TEXT_A = 0.8
STRIPES_ALPHA = 0.3
UNKNOWN_ALPHA = (0.2, 0.8)
CROP = 192  # the full run: each test photo cut to at most this many pixels a side (fits 90 min on 2 cores)
QUICK_CROP = (128, 192)
MEMORY_SIZE = 4096


@dataclass(frozen=True)
class Scenario:
    name: str
    noise_prior: str
    forward: str
    weight: float  # the weight every observation is made with; with ``alpha_range``, the guess of joint-fixed
    alpha_range: tuple[float, float] | None = None  # each photo's weight drawn from it, hidden from the sampler
    clean: str = "natural"  # the test images: the natural photos, or the faces (out of the natural prior's kind)
    families: tuple[str, ...] | None = None  # the text layer's font families (default: the training ones)
    shift: str | None = None  # out of distribution: "clean" or "noise" (None: in distribution)

    def weight_of(self, k: int, split: str) -> float:
        """The weight photo ``k`` of ``split`` is observed with (:func:`pipeline.bench.quality.hidden_alphas`)."""
        if self.alpha_range is None:
            return self.weight
        return float(hidden_alphas(self.alpha_range, k + 1, seed=SPLIT_SEEDS[split])[k])

    @property
    def sampler(self) -> dict[str, Any]:
        """The sampler's rule and final projection for this scenario: what a run with its forward model takes by
        default (:attr:`pipeline.forward.ForwardModel.sampler_defaults`; the composite overlay: ``projection``,
        no final projection). ``--rules`` gives every scenario one rule."""
        base = SamplerSettings()
        return {"rule": base.rule, "final_projection": base.final_projection,
                **FORWARD_MODELS[self.forward].sampler_defaults}


SCENARIOS = (Scenario("text", "text", "composite", TEXT_A), Scenario("stripes", "stripes-rgb", "blend", STRIPES_ALPHA),
             Scenario("unknown-alpha", "stripes-rgb", "blend", 0.5, alpha_range=UNKNOWN_ALPHA),
             Scenario("text-serif", "text", "composite", TEXT_A, families=(HELD_OUT,), shift="noise"),
             Scenario("faces", "stripes-rgb", "blend", STRIPES_ALPHA, clean="faces", shift="clean"))
SPLIT_SEEDS = {"test": 0, "val": 100}  # the hidden weights' seeds per split

# the joint sampler's (lambda_x, kappa_n) per rule, searched on validation crops
JOINT_GRID = {"dps": [(20.0, 20.0), (10.0, 200.0), (20.0, 200.0)],
              "projection": [(1.0, 20.0), (2.0, 20.0), (2.0, 40.0)]}
GAUSSIAN_GRID = [(0.0, 0.0), (0.0, 20.0)]  # the gaussian baseline's grid: these, then the rule's JOINT_GRID
VAL_CROP = (64, 96)  # the validation crops the sampler's weights are searched on

CLASSICAL = ("observation", "nlm", "tv", "bm3d", "inpaint")  # the baselines' rows (bm3d where it is installed)
METHODS = (*CLASSICAL, "gaussian", "joint", "supervised")  # what --methods may name

# baselines' validation grids (inpaint: the mask threshold)
GRIDS: dict[str, list[float]] = {
    "observation": [0.0], "nlm": [0.05, 0.1, 0.2, 0.4], "tv": [0.05, 0.1, 0.2, 0.4],
    "bm3d": [0.05, 0.1, 0.2, 0.4], "inpaint": [0.04, 0.08, 0.15, 0.3],
}


def _inpaint(img: np.ndarray, threshold: float) -> np.ndarray:
    from scipy.ndimage import binary_dilation, median_filter
    from skimage.restoration import inpaint_biharmonic

    size = (5, 5, 1) if img.ndim == 3 else (5, 5)
    departure = np.abs(img - median_filter(img, size=size))
    mask = departure.max(-1) > threshold if img.ndim == 3 else departure > threshold
    mask = binary_dilation(mask, iterations=1)
    if not mask.any():
        return img
    return inpaint_biharmonic(img, mask, channel_axis=-1 if img.ndim == 3 else None)


def baseline(name: str, y: np.ndarray, param: float) -> np.ndarray:
    """Baseline ``name`` on one observation ``(C, H, W)`` in [0, 1]."""
    if name == "inpaint":
        hwc = np.moveaxis(np.clip(y, 0, 1).astype(np.float64), 0, -1)
        out = _inpaint(hwc[..., 0] if hwc.shape[-1] == 1 else hwc, param)
        return np.clip(np.moveaxis(out.reshape(hwc.shape), -1, 0), 0, 1).astype(np.float32)
    return BASELINES[name](torch.from_numpy(y)[None], param)[0].numpy()


# --- data ----------------------------------------------------------------------------------------------

def _centre(img: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = max(0, (img.shape[0] - h) // 2), max(0, (img.shape[1] - w) // 2)
    return img[top:top + h, left:left + w]


def photos(split: str, quick: bool, crop: int = CROP) -> list[tuple[str, np.ndarray]]:
    """``(id, (C, H, W))`` photos of ``split``: grey ones with one channel."""
    chosen = natural_photos(split)
    if quick:
        chosen = chosen[:1]
    out = []
    for id_, img in chosen:
        h, w = QUICK_CROP if quick else (min(crop, img.shape[0]), min(crop, img.shape[1]))
        if quick and split == "val":
            h, w = h // 2, w // 2
        cut = _centre(img, h, w)
        out.append((id_, cut[None] if cut.ndim == 2 else np.moveaxis(cut, -1, 0)))
    return out


FACES_SIZE = 32  # the faces scenario's test images: the faces test split at the quality benchmark's size


def test_images(sc: Scenario, split: str, quick: bool, crop: int = CROP) -> list[tuple[str, np.ndarray]]:
    """The scenario's clean images of ``split``: the photos (:func:`photos`), or the faces, grey (``quick``: 4)."""
    if sc.clean == "natural":
        return photos(split, quick, crop)
    faces = load_embedded("faces", split, FACES_SIZE, 1, n=4 if quick else None)
    return list(zip(faces.ids, faces.images))


def observe(sc: Scenario, x: np.ndarray, k: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(y, noise)`` of photo ``x`` (its ``k``-th of the split) under the scenario's noise, in its channels."""
    h, w = x.shape[1:]
    if sc.noise_prior == "text":
        from pipeline.data.text import TRAIN_FAMILIES, text_layer

        nz = layer_for(text_layer(TEXT_SPLITS[split][0] + k, (h, w), families=sc.families or TRAIN_FAMILIES,
                                  words=(3, 6)), x.shape[0])
    else:
        nz = np.broadcast_to(stripe(STRIPES_SPLITS[split][0] + k, 32, (h, w)).astype(np.float32), x.shape).copy()
    fm = make_forward(sc.forward, 1, **{FORWARD_MODELS[sc.forward].weight: sc.weight_of(k, split)})
    y = fm.apply(torch.from_numpy(x)[None], torch.from_numpy(nz)[None])[0].numpy()
    return np.clip(y, 0, 1).astype(np.float32), nz


def _centre_chw(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(_centre(np.moveaxis(x, 0, -1), h, w), -1, 0))


def _back(x_hat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A result cleaned in RGB, in the channels of the truth ``x`` (grey by luminance)."""
    return grey_of(x_hat) if x.shape[0] == 1 else x_hat


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a


# --- measuring -----------------------------------------------------------------------------------------

class PeakRSS:
    """The process's peak resident memory while the block runs (sampled every 20 ms), in MB."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seam_ratio(img: np.ndarray, tiling: Any) -> float:
    """Mean absolute difference of neighbouring pixels across the tiles' borders over the same inside them
    (``img`` ``(C, H, W)``); NaN when the image is one tile."""
    h, w = img.shape[1:]
    ys = sorted({y + tiling.tile for y, _ in tiling.origins if 0 < y + tiling.tile < h}
                | {y for y, _ in tiling.origins if 0 < y < h})
    xs = sorted({x + tiling.tile for _, x in tiling.origins if 0 < x + tiling.tile < w}
                | {x for _, x in tiling.origins if 0 < x < w})
    dy = np.abs(np.diff(img, axis=1))  # dy[:, i] is between rows i and i + 1
    dx = np.abs(np.diff(img, axis=2))
    row_b = np.zeros(h - 1, bool)
    row_b[[y - 1 for y in ys]] = True
    col_b = np.zeros(w - 1, bool)
    col_b[[x - 1 for x in xs]] = True
    across = np.concatenate([dy[:, row_b].ravel(), dx[:, :, col_b].ravel()])
    inside = np.concatenate([dy[:, ~row_b].ravel(), dx[:, :, ~col_b].ravel()])
    if across.size == 0 or inside.size == 0 or inside.mean() == 0:
        return float("nan")
    return float(across.mean() / inside.mean())


def tilings(settings: SamplerSettings, sde: Any, forward: Any, shape: tuple[int, ...], tile: int) -> list[Any]:
    """The tiling of each of the sampler's network evaluations for images of ``shape`` (C, H, W)."""
    d = GuidedDenoiser(None, None, sde, forward, torch.zeros(1, *shape), settings, tile)  # type: ignore[arg-type]
    return [d.tiling(t.reshape(1)) for t in sde.timesteps(settings.steps - 1, power=settings.time_power)]


def last_tiling(settings: SamplerSettings, sde: Any, forward: Any, shape: tuple[int, ...], tile: int) -> Any:
    """The tiling of the sampler's last network evaluation for images of ``shape`` (C, H, W)."""
    return tilings(settings, sde, forward, shape, tile)[-1]


def _summary(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    v = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
    return (float(np.mean(v)), float(np.median(v))) if v else (float("nan"), float("nan"))


# --- the benchmark -------------------------------------------------------------------------------------

def large(quick: bool = False, steps: int | None = None, rule: str | None = None, crop: int = CROP,
          scenarios: list[str] | None = None, figure: str | None = None, log: Any = print,
          record: bool = True, methods: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"meta", "rows", "per_image"}`` (see the module docstring). ``rule``: every
    scenario's guidance rule (default: each scenario's own, :data:`SCENARIOS`). ``methods``: the rows to measure,
    of :data:`METHODS` (default all; ``joint`` stands for the unknown-alpha scenario's three sampler rows); the
    test images do not depend on it, so rows of runs with different ``methods`` compare. ``record`` (not with
    ``quick``): write the joint sampler's weights picked on validation into the tuned table
    (:mod:`pipeline.posterior.tuned`), so that a run with the same priors, forward model and settings uses them."""
    from pipeline.diffusion.checkpoint import load_model
    from pipeline.run.models import resolve_model

    t_start = time.perf_counter()
    steps = steps or (4 if quick else 50)
    wanted = set(METHODS if methods is None else methods)
    methods = [m for m in CLASSICAL if m in wanted and (m != "bm3d" or bm3d_available())]
    x_model, sde, _ = load_model(resolve_model("natural"))
    x_model.requires_grad_(False)
    tile = x_model.config.image_size
    rows: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    shown: list[list[np.ndarray]] = []
    picked: list[dict[str, Any]] = []  # the joint sampler's weights per scenario, for the tuned table
    for sc in [s for s in SCENARIOS if scenarios is None or s.name in scenarios]:
        n_model, _, _ = load_model(resolve_model(sc.noise_prior))
        n_model.requires_grad_(False)
        sc_rule, final_projection = rule or sc.sampler["rule"], sc.sampler["final_projection"]
        test, val = test_images(sc, "test", quick, crop), test_images(sc, "val", quick, crop)
        obs = [(id_, x, *observe(sc, x, k, "test")) for k, (id_, x) in enumerate(test)]
        val_obs = [(x, observe(sc, x, k, "val")[0]) for k, (_, x) in enumerate(val)]
        mp = sum(x.shape[1] * x.shape[2] for _, x, _, _ in obs) / 1e6
        results: dict[str, list[np.ndarray]] = {}
        for m in methods:
            grid = GRIDS[m][1:3] if quick and len(GRIDS[m]) > 2 else GRIDS[m]
            param = max(grid, key=lambda p: np.mean([metrics.psnr(torch.from_numpy(baseline(m, y, p))[None],
                                                                  torch.from_numpy(x)[None]).item()
                                                     for x, y in val_obs]))
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                results[m] = [baseline(m, y, param) for _, _, y, _ in obs]
                sec = time.perf_counter() - t0
            rows.append(_row(sc, m, obs, results[m], sec / mp, mem.peak, param=param))
            log(_fmt(rows[-1]))
        fm = make_forward(sc.forward, 1, **{FORWARD_MODELS[sc.forward].weight: sc.weight})
        runs: list[tuple[str, Any, SamplerSettings]] = []  # (method, noise prior, settings)
        if sc.alpha_range is None:
            fitted = None if "gaussian" not in wanted else GaussianPrior.fit(torch.from_numpy(load_embedded(
                "text" if sc.noise_prior == "text" else "stripes", "train", tile,
                4 if sc.noise_prior == "text" else 3, n=2000).images), sde, per_pixel=True)
            small = [(_centre_chw(x, *VAL_CROP), None) for x, _ in val_obs]
            small = [(x, observe(sc, x, k, "val")[0]) for k, (x, _) in enumerate(small)]
            for method, noise_net in [(m, net) for m, net in (("gaussian", fitted), ("joint", n_model))
                                      if m in wanted]:
                def val_psnr(lam_kap: tuple[float, float], net: Any = noise_net, small: list[Any] = small,
                             rule: str = sc_rule, fp: bool = final_projection, fm: Any = fm) -> float:
                    st = SamplerSettings(rule=rule, steps=steps, lambda_x=lam_kap[0], kappa_n=lam_kap[1],
                                         final_projection=fp)
                    d = Denoiser(x_model, net, sde, st, tile_batch=64)
                    return float(np.mean([_score(_back(d([f"val-{k}"], torch.from_numpy(_rgb(y))[None], fm)
                                                       .denoised[0].numpy(), x), x)["psnr"]
                                          for k, (x, y) in enumerate(small)]))
                grid = JOINT_GRID[sc_rule] if sc_rule in JOINT_GRID else [RULES[sc_rule].weights]
                if method == "gaussian":  # its weights from a grid with 0 (no pull): the baseline at its best
                    grid = [*GAUSSIAN_GRID, *grid]
                lam, kap = max(grid[:1] if quick else grid, key=val_psnr)
                runs.append((method, noise_net, SamplerSettings(rule=sc_rule, steps=steps, lambda_x=lam,
                                                                kappa_n=kap, final_projection=final_projection)))
        else:  # the weights a user's run takes, for the true, the estimated and the guessed alpha
            settings, _ = resolve_weights(SamplerSettings(rule=sc_rule, steps=steps, final_projection=final_projection),
                                          "natural", sc.noise_prior, sc.forward)
            runs = [(method, n_model, settings) for method in ALPHA_ROWS if "joint" in wanted]
        truth = [sc.weight_of(k, "test") for k in range(len(obs))]
        for method, noise_net, settings in runs:
            den = Denoiser(x_model, noise_net, sde, settings, tile_batch=64)
            xs, ns, seams, hats = [], [], [], []
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                for k, (id_, x, y, _) in enumerate(obs):
                    given = truth[k] if method in ("joint-oracle", "gaussian", "joint") else sc.weight
                    fm_k = make_forward(sc.forward, 1, **{FORWARD_MODELS[sc.forward].weight: given})
                    out = den([id_], torch.from_numpy(_rgb(y))[None], fm_k,
                              torch.ones(1, dtype=torch.bool) if method == "joint-auto" else None)
                    hats.append(given if out.alpha_hat is None else float(out.alpha_hat[0]))
                    x_hat, n_hat = out.denoised[0].numpy(), out.noise_estimate[0].numpy()
                    seams.append(seam_ratio(x_hat, last_tiling(settings, sde, fm_k, x_hat.shape, tile)))
                    if x.shape[0] == 1:
                        x_hat, n_hat = grey_of(x_hat), grey_of(n_hat)
                    xs.append(x_hat)
                    ns.append(n_hat)
                sec = time.perf_counter() - t0
            results[method] = xs
            if method == "joint" and sc.shift is None:  # an out-of-distribution scenario's pick is not the pair's
                picked.append(tuned_entry(settings, "natural", sc.noise_prior, sc.forward))
            if sc.alpha_range is not None:
                results[f"{method} alpha"] = hats
            rows.append(_row(sc, method, obs, xs, sec / mp, mem.peak, steps=steps, seams=seams,
                             weights=(settings.lambda_x, settings.kappa_n), settings=settings,
                             alpha_error=np.abs(np.array(hats) - truth) if sc.alpha_range is not None else None))
            log(_fmt(rows[-1]))
            if method in ("joint", "joint-auto"):
                results["noise estimate"] = ns
        # supervised: the pair's network, one evaluation per tile (pipeline.posterior.supervised)
        learned: list[str] = []
        sup = supervised_for("natural", sc.noise_prior) if "supervised" in wanted else None
        if sup is None and "supervised" in wanted:
            log(f"{sc.name}: no supervised network ships for natural + {sc.noise_prior}; train one with jointdiff "
                "train-supervised (docs/how-to/supervised.md)")
        elif sup is not None:
            s_model, _, _ = load_model(resolve_model(sup))
            hats = []
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                results["supervised"] = []
                for id_, x, y, _ in obs:
                    y_t = torch.from_numpy(_rgb(y))[None]
                    x_t = restore(s_model, y_t)
                    if sc.alpha_range is not None:  # the weight as sampler.path=fast estimates it: the noise prior's
                        hats.append(float(estimate_weight(n_model, sde, [id_], y_t, x_t, fm)[0][0]))
                    results["supervised"].append(_back(x_t[0].numpy(), x))
                sec = time.perf_counter() - t0
            if hats:
                results["supervised alpha"] = hats
            rows.append(_row(sc, "supervised", obs, results["supervised"], sec / mp, mem.peak,
                             alpha_error=np.abs(np.array(hats) - truth) if hats else None))
            log(_fmt(rows[-1]))
            learned.append("supervised")
        samplers = [m for m, _, _ in runs]
        for k, (id_, x, _, _) in enumerate(obs):
            alpha = ({"alpha": truth[k], **{f"{m} alpha_hat": results[f"{m} alpha"][k]
                                            for m in [*samplers, *learned] if f"{m} alpha" in results}}
                     if sc.alpha_range is not None else {})
            per_image.append({"scenario": sc.name, "id": id_, "height": x.shape[1], "width": x.shape[2],
                              "channels": x.shape[0], **alpha,
                              **{m: _score(results[m][k], x) for m in [*methods, *samplers, *learned]}})
        joint = "joint" if "joint" in results else "joint-auto"
        if joint not in results or len(methods) < 2:
            continue  # the figure shows the joint sampler beside the best baseline
        best = max(methods[1:], key=lambda m: next(r["psnr_mean"] for r in rows
                                                   if r["scenario"] == sc.name and r["method"] == m))
        id_, x, y, nz = obs[0]
        shown.append([_rgb(y), _rgb(results[joint][0]), _rgb(results[best][0]),
                      _layer_view(results["noise estimate"][0]), _rgb(x)])
    if record and not quick and picked:
        tuned_record(picked)
        log(f"recorded the joint sampler's weights of {len(picked)} scenario(s) in {TABLE}")
    if figure and shown:
        _figure(shown, figure)
        log(f"wrote {figure}: per scenario, observation | joint | best baseline | noise estimate | truth")
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": steps,
            "rules": {sc.name: rule or sc.sampler["rule"] for sc in SCENARIOS},
            "quick": quick, "crop": None if quick else crop,
            "methods": [*methods, *[m for m in METHODS[len(CLASSICAL):] if m in wanted]],
            "seconds": time.perf_counter() - t_start,
            "photos": [i for i, _ in photos("test", quick, crop)],
            "validation_photos": [i for i, _ in photos("val", quick, crop)],
            "text_a": TEXT_A, "stripes_alpha": STRIPES_ALPHA, "unknown_alpha": list(UNKNOWN_ALPHA)}
    return {"meta": meta, "rows": rows, "per_image": per_image}


def _score(x_hat: np.ndarray, x: np.ndarray) -> dict[str, float]:
    a, b = torch.from_numpy(x_hat)[None], torch.from_numpy(x)[None]
    return {"psnr": float(metrics.psnr(a, b)[0]), "ssim": float(metrics.ssim(a, b)[0])}


def _row(sc: Scenario, method: str, obs: list[Any], xs: list[np.ndarray], s_per_mp: float, peak_mb: float,
         param: float | None = None, steps: int | None = None, seams: list[float] | None = None,
         weights: tuple[float | None, float | None] | None = None, settings: SamplerSettings | None = None,
         alpha_error: np.ndarray | None = None) -> dict[str, Any]:
    scores = [_score(x_hat, x) for x_hat, (_, x, _, _) in zip(xs, obs)]
    psnr, ssim = [s["psnr"] for s in scores], [s["ssim"] for s in scores]
    finite_seams = [s for s in (seams or []) if math.isfinite(s)]
    return {"scenario": sc.name, "shift": sc.shift, "clean": sc.clean, "method": method, "steps": steps,
            "param": param,
            "lambda_x": weights[0] if weights else None, "kappa_n": weights[1] if weights else None,
            "rule": settings.rule if settings else None,
            "final_projection": settings.final_projection if settings else None,
            "n_images": len(xs), "psnr_mean": float(np.mean(psnr)), "psnr_median": float(np.median(psnr)),
            "ssim_mean": float(np.mean(ssim)), "ssim_median": float(np.median(ssim)),
            "seam_ratio": float(np.mean(finite_seams)) if finite_seams else None,
            "seconds_per_megapixel": s_per_mp, "peak_rss_mb": peak_mb,
            **({"alpha_error_median": float(np.median(alpha_error)), "alpha_error_mean": float(np.mean(alpha_error))}
               if alpha_error is not None else {})}


def _layer_view(n: np.ndarray) -> np.ndarray:
    """A noise estimate to look at: an RGBA (or grey-alpha) layer over mid grey, other noise as it is."""
    if n.shape[0] in (2, 4):
        c, m = _rgb(n[:-1]), n[-1:]
        return c * m + 0.5 * (1 - m)
    return _rgb(n)


def _figure(shown: list[list[np.ndarray]], path: str) -> None:
    from pipeline.viz import save_png

    pad = 4
    rows = []
    width = max(sum(p.shape[2] + pad for p in panels) + pad for panels in shown)
    for panels in shown:
        h = max(p.shape[1] for p in panels)
        row = np.ones((3, h + pad, width), np.float32)
        x0 = pad
        for p in panels:
            row[:, pad:pad + p.shape[1], x0:x0 + p.shape[2]] = np.clip(p, 0, 1)
            x0 += p.shape[2] + pad
        rows.append(row)
    mosaic = np.concatenate(rows + [np.ones((3, pad, width), np.float32)], axis=1)
    save_png(np.moveaxis(np.rint(mosaic * 255).astype(np.uint8), 0, -1), path)


def _fmt(r: dict[str, Any]) -> str:
    seam = f"  seam {r['seam_ratio']:.3f}" if r["seam_ratio"] is not None else ""
    seam += f"  ({r['rule']}, {r['lambda_x']:g}/{r['kappa_n']:g})" if r.get("rule") else ""
    return (f"{r['scenario']:8s} {r['method']:12s} PSNR {r['psnr_mean']:6.2f} (med {r['psnr_median']:6.2f})  "
            f"SSIM {r['ssim_mean']:.3f} (med {r['ssim_median']:.3f})  {r['seconds_per_megapixel']:8.1f} s/MP  "
            f"peak {r['peak_rss_mb']:6.0f} MB{seam}"
            + alpha_error_suffix(r))


def table(doc: dict[str, Any]) -> str:
    lines = ["| scenario | method | PSNR mean (median) | SSIM mean (median) | seam ratio | s/MP | peak RSS MB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        seam = "" if r["seam_ratio"] is None else f"{r['seam_ratio']:.3f}"
        lines.append(f"| {r['scenario']} | {r['method']} | {r['psnr_mean']:.2f} ({r['psnr_median']:.2f}) | "
                     f"{r['ssim_mean']:.3f} ({r['ssim_median']:.3f}) | {seam} | {r['seconds_per_megapixel']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += alpha_error_lines(doc["rows"])
    if doc.get("tiling"):
        tl = doc["tiling"]
        lines.append(f"\ntiling overhead (one {tl['size']}x{tl['size']} image in {tl['tile']}-pixel tiles against as "
                     f"many untiled {tl['tile']}x{tl['tile']} images, seconds per network evaluation): "
                     + ", ".join(f"{r} {tl[r]['ratio']:.3f}" for r in tl if isinstance(tl[r], dict)))
    if doc.get("memory"):
        m = doc["memory"]
        lines.append(f"\n{m['size']}x{m['size']} RGB at {m['steps']} steps ({m['rule']}): peak RSS "
                     f"{m['peak_rss_mb']:.0f} MB, {m['seconds']:.0f} s; at {m['full_steps']} steps about "
                     f"{m['extrapolated_seconds'] / 60:.0f} min ({m['seconds_per_megapixel_full']:.0f} s/MP)")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list):
            return [finite(x) for x in v]
        return v

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(finite(doc), indent=2, allow_nan=False) + "\n")


# --- tiling overhead: one large image against as many patch-size images ------------------------------------

OVERHEAD_SIZE = 160  # the tiled image's side: about 50 tiles of 32 per evaluation


def tiling_overhead(rules: tuple[str, ...] = ("dps", "projection"), size: int = OVERHEAD_SIZE, steps: int = 6,
                    repeats: int = 3, log: Any = print) -> dict[str, Any]:
    """Seconds per tile evaluation of one ``size`` x ``size`` RGB image cleaned in tiles, over seconds per image
    evaluation of a batch of as many untiled patch-size images (the mean number of tiles per evaluation), per rule:
    the tiling's cost (blending, the whole-image residual and its gradient, the random shifts). Priors ``natural``
    + ``stripes-rgb`` (blend); the two runs alternate and each keeps its best of ``repeats``."""
    from pipeline.diffusion.checkpoint import load_model
    from pipeline.run.models import resolve_model

    x_model, sde, _ = load_model(resolve_model("natural"))
    n_model, _, _ = load_model(resolve_model("stripes-rgb"))
    for m in (x_model, n_model):
        m.requires_grad_(False)
    tile = x_model.config.image_size
    gen = torch.Generator().manual_seed(0)
    big = torch.rand(1, 3, size, size, generator=gen)
    out: dict[str, Any] = {"size": size, "tile": tile, "steps": steps, "repeats": repeats}
    for rule in rules:
        settings, _ = resolve_weights(SamplerSettings(rule=rule, steps=steps), "natural", "stripes-rgb", "blend")
        counts = [len(tl.origins) for tl in tilings(settings, sde, make_forward("blend", 1, alpha=0.3),
                                                        tuple(big.shape[1:]), tile)]
        n_small = round(float(np.mean(counts)))
        small = torch.rand(n_small, 3, tile, tile, generator=gen)
        den = Denoiser(x_model, n_model, sde, settings, tile_batch=64)
        runs = {"tiled": (["big"], big, make_forward("blend", 1, alpha=0.3)),
                "untiled": ([f"s{i}" for i in range(n_small)], small, make_forward("blend", n_small, alpha=0.3))}
        best = {k: math.inf for k in runs}
        for _ in range(repeats):
            for k, (ids, y, fm) in runs.items():
                t0 = time.perf_counter()
                den(ids, y, fm)
                best[k] = min(best[k], time.perf_counter() - t0)
        per_tile = best["tiled"] / sum(counts)
        per_image = best["untiled"] / (n_small * steps)
        out[rule] = {"tiles_per_evaluation": float(np.mean(counts)), "untiled_batch": n_small,
                     "tiled_seconds": best["tiled"], "untiled_seconds": best["untiled"],
                     "ratio": per_tile / per_image}
        log(f"tiling overhead ({rule}): {per_tile * 1e3:.1f} ms per tile against {per_image * 1e3:.1f} ms per "
            f"untiled image: ratio {per_tile / per_image:.3f} ({np.mean(counts):.1f} tiles per evaluation)")
    return out


# --- memory: one 4096x4096 RGB image in a child process ------------------------------------------------

def memory(size: int = MEMORY_SIZE, steps: int = 2, full_steps: int = 50, rule: str = "dps",
           threads: int | None = None, log: Any = print) -> dict[str, Any]:
    """Clean one ``size`` x ``size`` RGB image (text composited over a smooth synthetic photo) at ``steps`` in a child
    process; its peak RSS (``ru_maxrss`` of the child) and seconds, and the time at ``full_steps`` extrapolated by
    the seconds per step."""
    cmd = [sys.executable, "-m", "pipeline.bench.large", "--child", str(size), str(steps), rule]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log(f"cleaning one {size}x{size} RGB image at {steps} steps ({rule}) in a child process ...")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory child failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        log("note: an earlier child had a larger peak; the figure is the child's own report")
    mp = size * size / 1e6
    per_step = child["seconds"] / steps
    return {"size": size, "steps": steps, "rule": rule, "peak_rss_mb": max(peak_kb, child["maxrss_kb"]) / 1024,
            "seconds": child["seconds"], "full_steps": full_steps, "extrapolated_seconds": per_step * full_steps,
            "seconds_per_megapixel_full": per_step * full_steps / mp, "tiles_per_step": child["tiles"]}


def _child(size: int, steps: int, rule: str) -> None:
    from pipeline.data.text import text_layer
    from pipeline.diffusion.checkpoint import load_model
    from pipeline.run.models import resolve_model

    x_model, sde, _ = load_model(resolve_model("natural"))
    n_model, _, _ = load_model(resolve_model("text"))
    x_model.requires_grad_(False)
    n_model.requires_grad_(False)
    v, u = np.meshgrid(np.linspace(0, 1, size, dtype=np.float32), np.linspace(0, 1, size, dtype=np.float32),
                       indexing="ij")
    x = np.stack([0.5 + 0.3 * np.sin(6 * u + 2 * v), 0.5 + 0.3 * np.cos(5 * v), 0.4 + 0.2 * u * v])
    fm = make_forward("composite", 1, a=TEXT_A)
    layer = text_layer(TEXT_SPLITS["test"][0], (size, size), words=(20, 40))
    y = fm.apply(torch.from_numpy(x.astype(np.float32))[None], torch.from_numpy(layer)[None]).clamp(0, 1)
    del x, layer
    settings, _ = resolve_weights(replace(SamplerSettings(rule=rule, steps=steps)), "natural", "text", "composite")
    tiling = last_tiling(settings, sde, fm, (3, size, size), x_model.config.image_size)
    t0 = time.perf_counter()
    out = Denoiser(x_model, n_model, sde, settings, tile_batch=64)(["memory"], y, fm)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(out.denoised).all()
    print(json.dumps({"seconds": seconds, "tiles": len(tiling.origins),
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":  # the --memory child: python -m pipeline.bench.large --child SIZE STEPS RULE
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python -m pipeline.bench.large --child SIZE STEPS RULE (jointdiff bench large --memory)")
