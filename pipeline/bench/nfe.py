"""``jointdiff bench nfe``: PSNR against network evaluations, per solver, weights re-tuned per step count.

On the quality benchmark's main scenario (test faces under test digits, alpha 0.5), each solver runs at
each of its step counts (NFE = steps per prior per image) with its guidance weights tuned for that step
count on the validation split (the same coordinate search as ``bench tune``: ``lambda_x`` over a grid
scaled by ``sqrt(200 / steps)`` with ``kappa_n = lambda_x / 2``, then the ratio ``kappa_n / lambda_x``),
then scored on the test split. The test split is never used for tuning.

Solvers (:data:`SOLVERS`): ``em`` is the Euler-Maruyama sampler of the paper (50, 100, 200 and 600 steps,
600 being the paper's setting); ``ddim`` is DDIM with ancestral noise (``eta = 1``) and its Tweedie
estimates clipped to the data range (``clip_denoised``) at 25, 50 and 100 steps; ``ddim-noclip`` (without
the clipping) and ``ddim-tp2`` (times packed towards ``t = 0``, ``time_power = 2``) are there to be asked
for with ``--solvers``. The tuned weights are written into the tuned table the product reads
(``pipeline/posterior/tuned.yaml``, :func:`pipeline.posterior.tuned.record`), next to ``bench tune``'s.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import metrics
from pipeline.bench.quality import (
    SCENARIOS,
    TUNE_RATIOS,
    TUNE_START_RATIO,
    observations,
    run_joint,
    score,
)
from pipeline.diffusion.checkpoint import load_model
from pipeline.posterior import tuned
from pipeline.posterior.sampler import SamplerSettings
from pipeline.priors import resolve_model

SOLVERS: dict[str, dict[str, Any]] = {
    "em": {"solver": "euler-maruyama"},
    "ddim": {"solver": "ddim", "eta": 1.0, "clip_denoised": True},
    "ddim-noclip": {"solver": "ddim", "eta": 1.0, "clip_denoised": False},
    "ddim-tp2": {"solver": "ddim", "eta": 1.0, "clip_denoised": True, "time_power": 2.0},
}
STEPS = {"em": [50, 100, 200, 600], "ddim": [25, 50, 100], "ddim-noclip": [25, 50, 100], "ddim-tp2": [25, 50, 100]}
DEFAULT_SOLVERS = ["em", "ddim"]
LAMBDA_GRID = [5.0, 10.0, 20.0]  # at 200 steps; scaled by sqrt(200 / steps)


def tune_weights(solver: str, steps: int, val: Any, models: tuple[Any, Any, Any], grid: list[float],
                 log: Callable[[str], None]) -> tuple[dict[str, float], dict[str, float]]:
    """The best ``(lambda_x, kappa_n)`` for ``solver`` at ``steps`` on ``val``; also every score."""
    x_model, n_model, sde = models
    clean = torch.from_numpy(val.clean)
    scores: dict[str, float] = {}

    def evaluate(lam: float, kap: float) -> float:
        cfg = SamplerSettings(rule="dps", steps=steps, lambda_x=lam, kappa_n=kap, **SOLVERS[solver])
        x_hat, _ = run_joint(x_model, n_model, sde, val, cfg)
        p = metrics.psnr(x_hat, clean).mean().item()
        p = p if math.isfinite(p) else float("-inf")
        scores[f"{lam:g}/{kap:g}"] = round(p, 3)
        log(f"  tune {solver:9s} {steps:4d} steps  lambda_x {lam:7.3g} kappa_n {kap:7.3g}: val PSNR {p:6.2f}")
        return p

    scaled = [round(g * (200 / steps) ** 0.5, 3) for g in grid]
    first = {lam: evaluate(lam, round(lam * TUNE_START_RATIO, 3)) for lam in scaled}
    lam = max(first, key=first.get)
    ratios = {TUNE_START_RATIO: first[lam], **{r: evaluate(lam, round(lam * r, 3)) for r in TUNE_RATIOS}}
    r = max(ratios, key=ratios.get)
    return {"lambda_x": lam, "kappa_n": round(lam * r, 3)}, scores


def nfe_curve(quick: bool = False, n: int | None = None, n_val: int | None = None,
              solvers: list[str] | None = None, steps: dict[str, list[int]] | None = None,
              write_guidance: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune and score every (solver, steps); returns ``{"meta", "rows", "weights"}``."""
    t0 = time.perf_counter()
    sc = SCENARIOS[0]
    n = n or (4 if quick else 100)
    n_val = n_val or (2 if quick else 10)
    solvers = solvers or DEFAULT_SOLVERS
    plan = steps or ({s: [4, 8] for s in solvers} if quick else {s: STEPS[s] for s in solvers})
    grid = LAMBDA_GRID[1:2] if quick else LAMBDA_GRID
    x_model, sde, _ = load_model(resolve_model(sc.image_prior))
    n_model, _, _ = load_model(resolve_model(sc.noise_prior))
    val = observations(sc, "val", n_val, seed=100)
    test = observations(sc, "test", n)
    clean = torch.from_numpy(test.clean)
    rows: list[dict[str, Any]] = []
    weights: dict[str, dict[int, dict[str, float]]] = {}
    for solver in solvers:
        weights[solver] = {}
        for st in plan[solver]:
            w, scores = tune_weights(solver, st, val, (x_model, n_model, sde), grid, log)
            cfg = SamplerSettings(rule="dps", steps=st, **w, **SOLVERS[solver])
            t1 = time.perf_counter()
            x_hat, _ = run_joint(x_model, n_model, sde, test, cfg)
            sec = (time.perf_counter() - t1) / n
            row = {**SOLVERS[solver], "curve": solver, "steps": st, "nfe": cfg.nfe, **w,
                   "val_psnr": max(scores.values()), **score(x_hat, clean), "seconds_per_image": sec}
            rows.append(row)
            weights[solver][st] = {**w, **SOLVERS[solver]}
            log(f"{solver:9s} NFE {st:4d}: test PSNR {row['psnr_mean']:.2f} (median {row['psnr_median']:.2f}), "
                f"SSIM {row['ssim_mean']:.3f}, {sec:.3f} s/image")
    doc = {"meta": {"command": "jointdiff bench nfe" + (" --quick" if quick else ""), "n_test": n, "n_val": n_val,
                    "scenario": "main: faces/test under digits/test, alpha 0.5", "rule": "dps",
                    "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
                    "date": time.strftime("%Y-%m-%d")},
           "rows": rows, "weights": weights}
    if write_guidance and not quick:
        save_weights(weights)
    return doc


def save_weights(weights: dict[str, dict[int, dict[str, float]]], path: Path = tuned.TABLE) -> None:
    """Record the tuned weights (per solver curve and step count) in the tuned table; other entries are kept."""
    entries = [tuned.entry(SamplerSettings(rule="dps", steps=st, **w), *tuned.BENCH_SETTING)
               for per_steps in weights.values() for st, w in per_steps.items()]
    tuned.record(entries, path)


def target(doc: dict[str, Any], reference: tuple[str, int] = ("em", 600), max_nfe: int = 50,
           within_db: float = 0.3) -> dict[str, Any]:
    """Whether some solver at ``max_nfe`` or fewer NFE is within ``within_db`` of the reference's PSNR."""
    rows = doc["rows"]
    ref = next((r for r in rows if (r["curve"], r["steps"]) == reference), None)
    cheap = [r for r in rows if r["nfe"] <= max_nfe and math.isfinite(r["psnr_mean"])]
    best = max(cheap, key=lambda r: r["psnr_mean"], default=None)
    if ref is None or best is None:
        return {"reference": None, "best": best, "met": False}
    gap = ref["psnr_mean"] - best["psnr_mean"]
    return {"reference": {k: ref[k] for k in ("curve", "steps", "psnr_mean")},
            "best": {k: best[k] for k in ("curve", "steps", "psnr_mean")}, "gap_db": gap, "met": gap <= within_db}


def table(doc: dict[str, Any]) -> str:
    lines = ["| solver | NFE | lambda_x | kappa_n | val PSNR | test PSNR mean ± std (median) | SSIM | s/image |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in doc["rows"]:
        lines.append(f"| {r['curve']} | {r['nfe']} | {r['lambda_x']:g} | {r['kappa_n']:g} | {r['val_psnr']:.2f} | "
                     f"{r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} ({r['psnr_median']:.2f}) | {r['ssim_mean']:.3f} | "
                     f"{r['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def svg(doc: dict[str, Any], width: int = 520, height: int = 320) -> str:
    """PSNR against NFE (log scale), one line per solver, as a standalone SVG."""
    rows = [r for r in doc["rows"] if math.isfinite(r["psnr_mean"])]
    left, right, top, bottom = 56, 110, 16, 40
    nfes = [r["nfe"] for r in rows]
    lo_x, hi_x = math.log(min(nfes)), math.log(max(nfes))
    lo_y = math.floor(min(r["psnr_mean"] for r in rows)) - 1
    hi_y = math.ceil(max(r["psnr_mean"] for r in rows)) + 1

    def px(nfe: float) -> float:
        return left + (math.log(nfe) - lo_x) / max(hi_x - lo_x, 1e-9) * (width - left - right)

    def py(p: float) -> float:
        return top + (hi_y - p) / (hi_y - lo_y) * (height - top - bottom)

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for p in range(lo_y, hi_y + 1, max(1, (hi_y - lo_y) // 6)):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(p):.1f}" y2="{py(p):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{py(p) + 4:.1f}" text-anchor="end">{p}</text>')
    for nfe in sorted(set(nfes)):
        out.append(f'<text x="{px(nfe):.1f}" y="{height - bottom + 16}" text-anchor="middle">{nfe}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">NFE per prior '
               '(log scale)</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 '
               f'{(top + height - bottom) / 2})" text-anchor="middle">test PSNR (dB)</text>')
    for k, solver in enumerate(dict.fromkeys(r["curve"] for r in rows)):
        pts = sorted((r["nfe"], r["psnr_mean"]) for r in rows if r["curve"] == solver)
        c = colours[k % len(colours)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in pts) + '"/>')
        out += [f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="3" fill="{c}"/>' for a, b in pts]
        out.append(f'<text x="{width - right + 8}" y="{top + 14 + 16 * k}" fill="{c}">{solver}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(doc: dict[str, Any], json_path: str | None, svg_path: str | None) -> None:
    def finite(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        rows = [{k: finite(v) for k, v in r.items()} for r in doc["rows"]]
        Path(json_path).write_text(json.dumps({**doc, "rows": rows}, indent=2, allow_nan=False) + "\n")
    if svg_path:
        Path(svg_path).parent.mkdir(parents=True, exist_ok=True)
        Path(svg_path).write_text(svg(doc))
