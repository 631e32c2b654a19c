"""What a person looks at after a cleaning run: the HTML report, the run history table, and the
dashboard's DuckDB queries (docs/concepts/outputs.md; docs/how-to/dashboards.md).

* :func:`write_report` (``jointdiff report RUN_URI``) reads a run folder ``<output>/runs/<run_id>/``
  on any URI (its ``metrics/``, ``errors/``, ``cleaned/``, the run's rows in ``<output>/summary/`` and,
  for the observation and the truth, the input shards the metrics point at) and writes one
  self-contained HTML file, ``report.html`` in the run folder by default.
* :func:`runs_table` (``jointdiff runs OUTPUT``) lists the run history, newest first.
* :data:`DASHBOARD_QUERIES` are the two queries a dashboard runs over the Parquet outputs; docs/how-to/dashboards.md
  shows them verbatim and a test runs them against runs made for the purpose.

Decisions (where docs/concepts/architecture.md is silent):

* **No JavaScript, no plotting library.** Plots are inline SVG drawn here (histograms and per-shard
  lines), images are 8-bit PNG data URIs; a Content-Security-Policy meta tag forbids every network
  fetch, so the file opens offline and a stray external reference shows up as a console error.
* **Which images.** With ground truth, images are ranked by PSNR and the groups are the best and the
  worst; without it, by the data-consistency residual, and the groups are named by it ("lowest
  residual", "highest residual"), never best or worst: a low residual can mean that the noise prior
  explained away part of the image. Then comes a random sample of the other images (seeded by the run
  id, so the same run gives the same report). Groups never share an image: a run of at most
  :data:`PER_GROUP` images shows them all, ranked, in one group; a larger one the top and bottom
  ``min(PER_GROUP, ranked // 2)`` and a sample of at most :data:`PER_GROUP` of the rest.
* **Panels per image**: observation (read back from the input shard, when it is reachable),
  cleaned, noise estimate, uncertainty (when several posterior samples were drawn; scaled so that
  the group's largest standard deviation is white) and truth (when known). Values outside [0, 1]
  (the sum model's ``.npy`` observation) are scaled by their maximum for display.
* **Runs without ground truth** show the reference-free figures (residual, spread, removed-noise
  energy) in place of PSNR/SSIM, in the plots, the tables and ``jointdiff runs``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.shards import decode_image, read_table, to_float
from pipeline.data.storage import join, open_fs, write_atomic

PER_GROUP = 8
MAX_ERROR_ROWS = 500
REPORT_NAME = "report.html"

# The dashboard contract: what a dashboard (DuckDB, Superset, Grafana) runs over OUTPUT, the output
# root of the runs. docs/how-to/dashboards.md shows these verbatim; tests/test_report.py runs them. The error rate reads
# each run's latest summary row, not errors/: a run that rejected nothing writes no errors file, and
# DuckDB fails on a pattern that matches no file.
PSNR_TREND_PER_DAY = """\
SELECT CAST(timezone('UTC', started_at) AS DATE) AS day,
       count(*) AS images,
       count(psnr) AS images_with_truth,
       avg(psnr_input) AS psnr_input_mean,
       avg(psnr) AS psnr_mean,
       avg(ssim) AS ssim_mean,
       avg(residual) AS residual_mean,
       avg(removed_energy) AS removed_energy_mean
FROM read_parquet('OUTPUT/runs/*/metrics/*/*.parquet', hive_partitioning = true)
GROUP BY day
ORDER BY day;"""

ERROR_RATE_PER_DATASET = """\
WITH latest AS (
    SELECT dataset, inputs, errors
    FROM read_parquet('OUTPUT/summary/*.parquet', filename = true)
    QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY finished_at DESC, filename DESC) = 1)
SELECT dataset,
       sum(inputs) AS input_rows,
       sum(errors) AS errors,
       sum(errors) / sum(inputs) AS error_rate
FROM latest
GROUP BY dataset
ORDER BY dataset;"""

DASHBOARD_QUERIES = {"psnr_trend_per_day": PSNR_TREND_PER_DAY, "error_rate_per_dataset": ERROR_RATE_PER_DATASET}


def dashboard_sql(name: str, output: str) -> str:
    """One of :data:`DASHBOARD_QUERIES` with ``OUTPUT`` replaced by an output root (a local path)."""
    return DASHBOARD_QUERIES[name].replace("OUTPUT", str(output).removeprefix("file://").rstrip("/"))


class RunNotFoundError(FileNotFoundError):
    """The URI is not a run folder (``<output>/runs/<run_id>/`` with ``metrics/``, ``errors/`` or ``_done/``)."""


# ---------------------------------------------------------------- reading a run
@dataclass
class RunData:
    run_uri: str
    run_id: str
    output: str | None  # the output root (``<output>/runs/<run_id>``), when the URI has that shape
    metrics: pa.Table | None
    errors: pa.Table | None
    summaries: list[dict[str, Any]]  # this run's summary rows, oldest first

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.summaries[-1] if self.summaries else None

    def column(self, name: str) -> list[Any]:
        m = self.metrics
        return m.column(name).to_pylist() if m is not None and name in m.column_names else []

    @property
    def has_truth(self) -> bool:
        return any(v is not None for v in self.column("psnr"))

    @property
    def n_cleaned(self) -> int:
        return 0 if self.metrics is None else self.metrics.num_rows

    @property
    def n_errors(self) -> int:
        return 0 if self.errors is None else self.errors.num_rows


def _read_all(uri: str) -> pa.Table | None:
    from pipeline.summary import read_parts

    return read_parts(uri)


def load_run(run_uri: str) -> RunData:
    """Read what the report needs from a run folder; :class:`RunNotFoundError` if it is not one."""
    run_uri = str(run_uri).rstrip("/")
    fs, path = open_fs(run_uri)
    # a folder holds files only for rows it has, so a run may lack metrics/ or errors/ (not both, unless
    # its input had no row at all: then only its completion markers, _done/, are there)
    if not fs.exists(path) or not any(fs.exists(f"{path}/{sub}") for sub in ("metrics", "errors", "_done")):
        raise RunNotFoundError(f"{run_uri}: not a cleaning run folder (expected OUTPUT/runs/RUN_ID/ holding "
                               "metrics/, errors/ or _done/, as written by jointdiff clean, denoise or the flow)")
    run_id = run_uri.rsplit("/", 1)[-1]
    output = run_uri.rsplit("/runs/", 1)[0] if "/runs/" in run_uri else None
    summaries: list[dict[str, Any]] = []
    if output is not None:
        from pipeline.summary import read_summaries

        table = read_summaries(output)
        if table is not None:
            summaries = sorted((r for r in table.to_pylist() if r["run_id"] == run_id), key=lambda r: r["finished_at"])
    return RunData(run_uri, run_id, output, _read_all(join(run_uri, "metrics")), _read_all(join(run_uri, "errors")),
                   summaries)


# ---------------------------------------------------------------- picking and decoding images
def _finite(values: Sequence[Any]) -> np.ndarray:
    return np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def pick_images(run: RunData, per_group: int = PER_GROUP) -> dict[str, list[dict[str, Any]]]:
    """The metrics rows shown in the report, by group; no image is in two groups.

    With ground truth, images are ranked by PSNR (groups ``best`` and ``worst``); without it by the
    residual (``lowest-residual`` and ``highest-residual``: without truth the figure names the group,
    never best or worst). A run of at most ``per_group`` images gets one group, ``all``, ranked (images
    without the figure last); a larger one the top and bottom ``k = min(per_group, ranked // 2)`` and
    ``random``, a sample (seeded by the run id) of at most ``per_group`` of the other images."""
    if run.metrics is None or not run.metrics.num_rows:
        return {}
    rows = sorted(run.metrics.to_pylist(), key=lambda r: (r["shard"], r["row"]))
    key = "psnr" if run.has_truth else "residual"
    has = [r.get(key) is not None and math.isfinite(r[key]) for r in rows]
    ranked = [r for r, ok in zip(rows, has) if ok]
    ranked.sort(key=lambda r: (r[key], r["shard"], r["row"]), reverse=key == "psnr")  # best (or lowest) first
    if len(rows) <= per_group:
        return {"all": ranked + [r for r, ok in zip(rows, has) if not ok]}
    k = min(per_group, len(ranked) // 2)
    top, bottom = ranked[:k], ranked[::-1][:k]
    shown = {(r["shard"], r["row"]) for r in top + bottom}
    rest = [r for r in rows if (r["shard"], r["row"]) not in shown]
    sample = random.Random(run.run_id).sample(rest, min(per_group, len(rest)))
    sample.sort(key=lambda r: (r["shard"], r["row"]))
    names = ("best", "worst") if key == "psnr" else ("lowest-residual", "highest-residual")
    return {g: v for g, v in ((names[0], top), (names[1], bottom), ("random", sample)) if v}


def _float_image(cell: dict[str, Any] | None) -> np.ndarray | None:
    if not cell or not cell.get("bytes"):
        return None
    try:
        return to_float(decode_image(cell["bytes"], cell.get("path") or ""))
    except Exception:
        return None


def _panels(run: RunData, picked: dict[str, list[dict[str, Any]]]) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """Images for every picked (shard, row): ``{(shard, row): {panel: (C, H, W) float}}`` and the panel
    names present; reads only the shards that hold a picked row."""
    wanted: dict[str, set[int]] = {}
    for rows in picked.values():
        for r in rows:
            wanted.setdefault(r["shard"], set()).add(r["row"])
    dataset = run.latest["dataset"] if run.latest else (run.column("dataset") or [None])[0]
    out: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for shard, shard_rows in sorted(wanted.items()):
        ids = {r["id"]: (shard, r["row"]) for rows in picked.values() for r in rows if r["shard"] == shard}
        try:
            cleaned = read_table(join(run.run_uri, "cleaned", shard), attempts=3)
        except Exception:
            cleaned = None
        if cleaned is not None:
            cols = [c for c in ("denoised", "noise_estimate", "uncertainty") if c in cleaned.column_names]
            for row in cleaned.select(["id", *cols]).to_pylist():
                if row["id"] in ids:
                    out.setdefault(ids[row["id"]], {}).update({c: _float_image(row[c]) for c in cols})
        if dataset:
            try:
                inp = read_table(join(dataset, shard), attempts=2)
            except Exception:
                inp = None
            if inp is not None:
                cols = [c for c in ("observation", "clean") if c in inp.column_names]
                data = {c: inp.column(c).to_pylist() for c in cols}
                for r in shard_rows:
                    if r < inp.num_rows:
                        out.setdefault((shard, r), {}).update({c: _float_image(data[c][r]) for c in cols})
    order = ("observation", "denoised", "noise_estimate", "uncertainty", "clean")
    present = [p for p in order if any(v.get(p) is not None for v in out.values())]
    return out, present


PANEL_TITLES = {"observation": "observation", "denoised": "cleaned", "noise_estimate": "noise estimate",
                "uncertainty": "uncertainty", "clean": "truth"}


def _data_uri(img: np.ndarray, scale: float = 1.0) -> str:
    from pipeline.viz import png_bytes

    a = np.asarray(img, dtype=np.float32)
    top = float(np.nanmax(a)) if a.size else 1.0
    if scale != 1.0:
        a = a * scale
    elif top > 1.0:  # .npy values outside [0, 1]: scale for display
        a = a / top
    mosaic = np.moveaxis(np.rint(np.clip(np.nan_to_num(a), 0, 1) * 255).astype(np.uint8), 0, -1)
    return "data:image/png;base64," + base64.b64encode(png_bytes(thumbnail(mosaic))).decode()


THUMB_PX = 512  # the longest side of an image embedded in the report


def thumbnail(img: np.ndarray, longest: int = THUMB_PX) -> np.ndarray:
    """An ``(H, W, C)`` uint8 image shrunk (area-averaged, aspect kept) so that its longest side is at most
    ``longest``; smaller images come back as they are."""
    h, w = img.shape[:2]
    if max(h, w) <= longest:
        return img
    from PIL import Image

    size = (max(1, round(w * longest / max(h, w))), max(1, round(h * longest / max(h, w))))
    grey = img.shape[-1] == 1
    small = np.asarray(Image.fromarray(img[..., 0] if grey else img).resize(size, Image.Resampling.BOX))
    return small[..., None] if grey else small


# ---------------------------------------------------------------- SVG plots
_W, _H, _M = 420, 240, 44
_COLOURS = ("#999999", "#1f5fbf", "#d0632a", "#2a9d4b")


def _colour(k: int, n: int) -> str:
    return _COLOURS[k + 1 if n < len(_COLOURS) else k]


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """At most about ``n`` round ticks (steps of 1, 2 or 5 times a power of ten) in ``[lo, hi]``; whole
    numbers only with ``integer`` (an axis of counts has no half image)."""
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_tick(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


_LEGEND_ROW = 14  # px per legend row
_BOTTOM = _H - _M + 10  # y of the plot frame's bottom edge


def _legend_layout(names: Sequence[str]) -> tuple[list[tuple[float, float]], float]:
    """Where each legend entry goes (x, y of its swatch's top): in rows between the title and the plot
    frame, wrapped so that entries never overlap each other or the data; and the y where the frame
    starts. An entry is a 10 px swatch and its text (at most 6 px per character at font size 10)."""
    x, y, at = float(_M), 20.0, []
    for name in names:
        width = 14 + 6 * len(name) + 12
        if x > _M and x + width > _W - 10:
            x, y = float(_M), y + _LEGEND_ROW
        at.append((x, y))
        x += width
    return at, (y + _LEGEND_ROW + 2 if names else 20.0)


def _y_scale(y0: float, y1: float, legend: Sequence[str]) -> Callable[[float], float]:
    """The y pixel of a value: ``y0`` on the frame's bottom edge, ``y1`` 10 px under its top edge."""
    top = _legend_layout(legend)[1] + 10
    return lambda v: _BOTTOM - (_BOTTOM - top) * (v - y0) / ((y1 - y0) or 1)


def _frame(kind: str, title: str, xlabel: str, ylabel: str, x: tuple[float, float], y: tuple[float, float],
           body: list[str], legend: Sequence[str], count_axis: bool = False, x_ticks: bool = False) -> str:
    (x0, x1), (y0, y1) = x, y
    px = lambda v: _M + (_W - _M - 10) * (v - x0) / ((x1 - x0) or 1)  # noqa: E731
    py = _y_scale(y0, y1, legend)
    places, top = _legend_layout(legend)
    parts = [f'<svg class="plot" data-plot="{kind}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
             f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="white"/>',
             f'<text x="{_W / 2}" y="14" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<rect class="frame" x="{_M}" y="{top:.0f}" width="{_W - _M - 10}" height="{_BOTTOM - top:.0f}" '
             'fill="none" stroke="#888"/>']
    for t in _ticks(y0, y1, integer=count_axis):
        parts.append(f'<text x="{_M - 4}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="10">{_fmt_tick(t)}</text>'
                     f'<line x1="{_M}" x2="{_W - 10}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
    if kind.endswith("-hist") or x_ticks:
        for t in _ticks(x0, x1):
            parts.append(f'<text x="{px(t):.1f}" y="{_H - _M + 24}" text-anchor="middle" font-size="10">'
                         f"{_fmt_tick(t)}</text>")
    parts.append(f'<text x="{_M + (_W - _M) / 2}" y="{_H - 6}" text-anchor="middle" font-size="11">'
                 f"{html.escape(xlabel)}</text>")
    parts.append(f'<text x="12" y="{_H / 2}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 12 {_H / 2})">{html.escape(ylabel)}</text>')
    parts.extend(body)
    for k, (name, (lx, ly)) in enumerate(zip(legend, places)):
        parts.append(f'<g class="legend"><rect x="{lx:.0f}" y="{ly:.0f}" width="10" height="10" '
                     f'fill="{_colour(k, len(legend))}"/><text x="{lx + 14:.0f}" y="{ly + 9:.0f}" font-size="10">'
                     f"{html.escape(name)}</text></g>")
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(kind: str, title: str, xlabel: str, series: dict[str, Sequence[Any]], bins: int = 20) -> str:
    """Overlaid histograms (step outlines) of each series' finite values, on shared bins."""
    data = {k: _finite(v) for k, v in series.items()}
    data = {k: v for k, v in data.items() if v.size}
    every = np.concatenate(list(data.values())) if data else np.array([0.0, 1.0])
    lo, hi = float(every.min()), float(every.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(v, edges)[0] for k, v in data.items()}
    top = max([int(c.max()) for c in counts.values()] + [1])
    px = lambda v: _M + (_W - _M - 10) * (v - lo) / (hi - lo)  # noqa: E731
    py = _y_scale(0, top, list(counts))
    body = []
    for k, (name, c) in enumerate(counts.items()):
        pts = [f"{px(edges[0]):.1f},{py(0):.1f}"]
        for i, n in enumerate(c):
            pts += [f"{px(edges[i]):.1f},{py(n):.1f}", f"{px(edges[i + 1]):.1f},{py(n):.1f}"]
        pts.append(f"{px(edges[-1]):.1f},{py(0):.1f}")
        colour = _colour(k, len(counts))
        body.append(f'<polyline class="series" data-series="{html.escape(name)}" points="{" ".join(pts)}" '
                    f'fill="{colour}" fill-opacity="0.25" stroke="{colour}" stroke-width="1.5"/>')
    return _frame(kind, title, xlabel, "images", (lo, hi), (0, top), body, list(counts), count_axis=True)


def svg_scatter(kind: str, title: str, xlabel: str, ylabel: str, points: Sequence[tuple[float, float]],
                lo: float = 0.0, hi: float = 1.0) -> str:
    """Points ``(x, y)`` on equal axes from ``lo`` to ``hi``, with the diagonal ``y = x``."""
    px = lambda v: _M + (_W - _M - 10) * (v - lo) / (hi - lo)  # noqa: E731
    py = _y_scale(lo, hi, ["images"])
    body = [f'<line class="diagonal" x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
            'stroke="#bbb" stroke-dasharray="4 3"/>']
    body += [f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{_colour(0, 1)}" '
             'fill-opacity="0.7"/>' for x, y in points]
    return _frame(kind, title, xlabel, ylabel, (lo, hi), (lo, hi), body, ["images"], x_ticks=True)


def svg_lines(kind: str, title: str, ylabel: str, labels: Sequence[str], series: dict[str, Sequence[Any]],
              xlabel: str = "shard") -> str:
    """One line per series over the categories ``labels`` (shards, or what ``xlabel`` names), with a marker per
    point."""
    vals = _finite([v for s in series.values() for v in s])
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    pad = (hi - lo) * 0.1 or 0.5
    lo, hi = lo - pad, hi + pad
    n = len(labels)
    px = lambda i: _M + (_W - _M - 10) * (i + 0.5) / max(n, 1)  # noqa: E731
    py = _y_scale(lo, hi, list(series))
    body = []
    for k, (name, s) in enumerate(series.items()):
        colour = _colour(k, len(series))
        pts = [(px(i), py(v)) for i, v in enumerate(s) if v is not None and math.isfinite(v)]
        body.append(f'<polyline class="series" data-series="{html.escape(name)}" fill="none" stroke="{colour}" '
                    f'stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        body.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts)
    step = max(1, math.ceil(n / 8))
    for i, lab in enumerate(labels):
        if i % step == 0:
            short = lab.removesuffix(".parquet").removeprefix("shard-")
            body.append(f'<text x="{px(i):.1f}" y="{_H - _M + 24}" text-anchor="middle" font-size="10">'
                        f"{html.escape(short)}</text>")
    return _frame(kind, title, xlabel, ylabel, (0, 1), (lo, hi), body, list(series))


def plot_specs(run: RunData) -> list[tuple[str, str]]:
    """The report's plots as ``(kind, svg)``: with ground truth, PSNR and SSIM distributions (before vs
    after) and their per-shard means; without, the reference-free figures the same way; where the blend weight
    was estimated, the estimates against the given alpha, or their distribution when none was given."""
    if run.metrics is None or not run.metrics.num_rows:
        return []
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in run.metrics.to_pylist():
        by_shard.setdefault(r["shard"], []).append(r)
    shards = sorted(by_shard)

    def per_shard(col: str) -> list[float | None]:
        means = [_finite([r[col] for r in by_shard[s]]) for s in shards]
        return [float(v.mean()) if v.size else None for v in means]
    return _quality_plots(run, shards, per_shard) + _alpha_plots(run)


def _alpha_plots(run: RunData) -> list[tuple[str, str]]:
    """Where the sampler estimated the blend weight: the estimate against the given alpha (a dataset that knows
    it, under ``forward.alpha: auto``), else the estimates' distribution."""
    given, hat, err = run.column("alpha"), run.column("alpha_hat"), run.column("alpha_error")
    pairs = [(a, h) for a, h, e in zip(given, hat, err) if None not in (a, h, e)]
    if pairs:
        return [("alpha-scatter", svg_scatter("alpha-scatter", "estimated against given alpha", "alpha (given)",
                                              "alpha_hat (estimated)", pairs))]
    est = [h for a, h in zip(given, hat) if a is None and h is not None]
    if est:
        return [("alpha-hist", svg_histogram("alpha-hist", "estimated alpha per image (none given)", "alpha_hat",
                                             {"alpha_hat": est}))]
    return []


def _quality_plots(run: RunData, shards: list[str], per_shard: Callable[[str], list[float | None]]
                   ) -> list[tuple[str, str]]:
    if run.has_truth:
        return [
            ("psnr-hist", svg_histogram("psnr-hist", "PSNR per image", "PSNR (dB)",
                                        {"observation": run.column("psnr_input"), "cleaned": run.column("psnr")})),
            ("ssim-hist", svg_histogram("ssim-hist", "SSIM per image", "SSIM",
                                        {"observation": run.column("ssim_input"), "cleaned": run.column("ssim")})),
            ("psnr-shard", svg_lines("psnr-shard", "mean PSNR per shard", "PSNR (dB)", shards,
                                     {"observation": per_shard("psnr_input"), "cleaned": per_shard("psnr")})),
            ("ssim-shard", svg_lines("ssim-shard", "mean SSIM per shard", "SSIM", shards,
                                     {"observation": per_shard("ssim_input"), "cleaned": per_shard("ssim")})),
        ]
    # a row the supervised network cleaned has no residual or spread (sampler.path fast): no empty plot for them
    figures = [f for f in ("residual", "removed_energy", "spread")
               if f == "removed_energy" or _finite(run.column(f)).size]
    names = {"residual": "residual (RMS)", "removed_energy": "removed-noise energy", "spread": "posterior spread"}
    out = [(f"{f}-hist", svg_histogram(f"{f}-hist", f"{names[f]} per image (no ground truth)", names[f],
                                       {names[f]: run.column(f)})) for f in figures]
    out.append(("reference-free-shard", svg_lines("reference-free-shard", "mean reference-free figures per shard",
                                                  "mean", shards, {names[f]: per_shard(f) for f in figures})))
    return out


# ---------------------------------------------------------------- the HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{font-weight:600;background:#fafafa}
.plots{display:flex;flex-wrap:wrap;gap:12px}
img.panel{max-width:192px;max-height:192px;min-width:96px;image-rendering:pixelated;border:1px solid #ccc}
.note{color:#666;font-size:13px} code{font-size:12px}
"""


def _num(v: Any, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    return ('<table class="kv">' + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in pairs)
            + "</table>")


def _summary_html(run: RunData) -> str:
    s = run.latest
    m = lambda c: _finite(run.column(c))  # noqa: E731
    mean = lambda c: float(m(c).mean()) if m(c).size else None  # noqa: E731
    pairs: list[tuple[str, Any]] = [("run id", f"<code>{html.escape(run.run_id)}</code>"),
                                    ("run folder", f"<code>{html.escape(run.run_uri)}</code>")]
    if s:
        models = json.loads(s["models"]) if s.get("models") else {}
        pairs += [("input dataset", f"<code>{html.escape(str(s['dataset']))}</code>"),
                  ("started / finished (UTC)",
                   f"{s['started_at']:%Y-%m-%d %H:%M:%S} / {s['finished_at']:%Y-%m-%d %H:%M:%S}"),
                  ("input rows", s["inputs"]), ("cleaned", s["cleaned"]), ("errors", s["errors"]),
                  ("cleaned by the last invocation", s["processed"]),
                  ("wall time (last invocation)", f"{s['wall_seconds']:.1f} s"),
                  ("images/s", _num(s["images_per_s"], ".3f")),
                  ("NFE per prior per image" if json.loads(s["sampler"]).get("path", "joint") == "joint"
                   else "NFE per image (the rows' mean over every network; the supervised network counts 1)", s["nfe"]),
                  ("models", "<br>".join(f"{html.escape(k)}: <code>{html.escape(str(v))}</code>"
                                         for k, v in models.items())),
                  ("sampler", f"<code>{html.escape(str(s['sampler']))}</code>"),
                  ("config hash", f"<code>{html.escape(str(s['config_hash']))}</code>"),
                  ("executor", html.escape(str(s["executor"])))]
    else:
        pairs += [("cleaned", run.n_cleaned), ("errors", run.n_errors),
                  ("summary row", "none found in OUTPUT/summary/ (the run has not finished, or the folder is "
                                  "not under OUTPUT/runs/)")]
    if run.has_truth:
        pairs += [("PSNR (mean, dB)", f"{_num(mean('psnr_input'), '.2f')} &rarr; {_num(mean('psnr'), '.2f')} "
                                      f"(median {_num(float(np.median(m('psnr'))), '.2f')})"),
                  ("SSIM (mean)", f"{_num(mean('ssim_input'), '.3f')} &rarr; {_num(mean('ssim'), '.3f')}")]
    else:
        pairs += [("ground truth", "none: reference-free figures instead of PSNR/SSIM")]
    pairs += [("residual (mean RMS)", _num(mean("residual"), ".4f")),
              ("posterior spread (mean)", _num(mean("spread"), ".4f")),
              ("removed-noise energy (mean)", _num(mean("removed_energy"), ".4f"))]
    out = _kv_table(pairs)
    if len(run.summaries) > 1:
        out += ("<p class=\"note\">Invocations of this run (a resumed or nightly run appends one row each):</p>"
                "<table><tr><th>finished (UTC)</th><th>cleaned now</th><th>cleaned so far</th><th>errors</th>"
                "<th>images/s</th></tr>" + "".join(
                    f"<tr><td>{r['finished_at']:%Y-%m-%d %H:%M:%S}</td><td class=num>{r['processed']}</td>"
                    f"<td class=num>{r['cleaned']}</td><td class=num>{r['errors']}</td>"
                    f"<td class=num>{_num(r['images_per_s'], '.3f')}</td></tr>" for r in run.summaries) + "</table>")
    return out


def _figures(r: dict[str, Any], truth: bool) -> str:
    if truth:
        return (f"PSNR {_num(r['psnr_input'], '.2f')} &rarr; {_num(r['psnr'], '.2f')} dB<br>"
                f"SSIM {_num(r['ssim_input'], '.3f')} &rarr; {_num(r['ssim'], '.3f')}<br>"
                f"residual {_num(r['residual'], '.4f')}")
    return (f"residual {_num(r['residual'], '.4f')}<br>spread {_num(r['spread'], '.4f')}<br>"
            f"removed energy {_num(r['removed_energy'], '.4f')}")


def _grids_html(run: RunData, picked: dict[str, list[dict[str, Any]]]) -> str:
    images, present = _panels(run, picked)
    unc = [v["uncertainty"] for v in images.values() if v.get("uncertainty") is not None]
    unc_top = max([float(u.max()) for u in unc] + [0.0])
    titles = {"best": "Best by PSNR", "worst": "Worst by PSNR", "lowest-residual": "Lowest residual",
              "highest-residual": "Highest residual", "random": "A random sample of the others",
              "all": "All images, by PSNR, best first" if run.has_truth else "All images, by residual, lowest first"}
    out = []
    if "observation" not in present and run.n_cleaned:
        out.append('<p class="note">The input shards could not be read from here, so the observation '
                   "(and truth) columns are missing.</p>")
    if "uncertainty" in present:
        out.append(f'<p class="note">Uncertainty is the posterior standard deviation, scaled so that '
                   f"{unc_top:.4f} is white.</p>")
    for group, rows in picked.items():
        out.append(f'<h3>{titles[group]} ({len(rows)})</h3><table class="grid" data-group="{group}"><tr><th>image</th>'
                   + "".join(f"<th>{PANEL_TITLES[p]}</th>" for p in present) + "<th>figures</th></tr>")
        for r in rows:
            panels = images.get((r["shard"], r["row"]), {})
            cells = []
            for p in present:
                img = panels.get(p)
                if img is None:
                    cells.append("<td>n/a</td>")
                    continue
                scale = 1.0 / unc_top if p == "uncertainty" and unc_top > 0 else 1.0
                cells.append(f'<td><img class="panel" data-panel="{p}" alt="{PANEL_TITLES[p]} of '
                             f'{html.escape(str(r["id"]))}" src="{_data_uri(img, scale)}"></td>')
            out.append(f"<tr><td><code>{html.escape(str(r['id']))}</code><br><span class=note>"
                       f"{html.escape(r['shard'])} row {r['row']}</span></td>{''.join(cells)}"
                       f"<td>{_figures(r, run.has_truth)}</td></tr>")
        out.append("</table>")
    return "".join(out)


def _errors_html(run: RunData) -> str:
    if not run.n_errors:
        return '<p class="note">No input row was rejected.</p>'
    rows = sorted(run.errors.to_pylist(), key=lambda e: (e["shard"], e["row"]))
    shown = rows[:MAX_ERROR_ROWS]
    more = (f'<p class="note">The first {MAX_ERROR_ROWS} of {len(rows)} rows; all are in '
            f"<code>{html.escape(run.run_uri)}/errors/</code>.</p>") if len(rows) > len(shown) else ""
    whole = any(e["row"] == -1 for e in shown)
    note = ('<p class="note"><i>whole shard</i>: the shard could not be read at all, so its rows cannot be '
            "told apart; it is one error row, stored with <code>row = -1</code> and no id.</p>") if whole else ""
    return (more + '<table class="errors"><tr><th>shard</th><th>row</th><th>id</th><th>stage</th><th>reason</th></tr>'
            + "".join(f"<tr><td>{html.escape(e['shard'])}</td>"
                      + ("<td><i>whole shard</i></td>" if e["row"] == -1 else f"<td class=num>{e['row']}</td>")
                      + ("<td>&mdash;</td>" if e["id"] is None else f"<td>{html.escape(str(e['id']))}</td>")
                      + f"<td>{html.escape(e['stage'])}</td><td>{html.escape(e['reason'])}</td></tr>"
                      for e in shown) + "</table>" + note)


def render_report(run: RunData, per_group: int = PER_GROUP) -> str:
    """The report of ``run`` as one self-contained HTML document."""
    picked = pick_images(run, per_group)
    plots = plot_specs(run)
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    body = [f"<h1>Cleaning run <code>{html.escape(run.run_id)}</code></h1>",
            f'<p class="note">jointdiff report, written {made}. Everything is in this file; it needs no network.</p>',
            "<h2>Summary</h2>", _summary_html(run),
            "<h2>Distributions and per-shard trends</h2>",
            ('<div class="plots">' + "".join(svg for _, svg in plots) + "</div>") if plots
            else '<p class="note">No image was cleaned, so there is nothing to plot.</p>',
            "<h2>Images</h2>", _grids_html(run, picked) if run.n_cleaned else '<p class="note">No cleaned images.</p>',
            f"<h2>Errors ({run.n_errors})</h2>", _errors_html(run)]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>jointdiff run {html.escape(run.run_id)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def write_report(run_uri: str, out: str | None = None, per_group: int = PER_GROUP) -> str:
    """Write the report of the run at ``run_uri`` (any URI) to ``out`` (default
    ``<run_uri>/report.html``, any URI); returns where it went."""
    run = load_run(run_uri)
    target = str(out) if out else join(run.run_uri, REPORT_NAME)
    write_atomic(target, render_report(run, per_group).encode("utf-8"))
    return target


# ---------------------------------------------------------------- the run history
def read_history(uri: str) -> pa.Table:
    """The summary rows under ``uri``: an output root holding ``summary/``, or that folder itself."""
    from pipeline.summary import read_summaries

    uri = str(uri).rstrip("/")
    table = read_summaries(uri)
    if table is None and uri.rsplit("/", 1)[-1] == "summary":
        table = _read_all(uri)
    if table is None:
        fs, path = open_fs(uri)
        what = "no such folder" if not fs.exists(path) else "no summary rows in it (no run has finished there)"
        raise FileNotFoundError(f"{uri}: {what}; give the output root of the runs (it holds summary/) or its "
                                "summary/ folder")
    return table


def history_rows(uri: str, limit: int | None = 20) -> list[dict[str, Any]]:
    """Summary rows, newest first (by ``finished_at``; rows of the same second in the order their files
    were appended, which their names, stamped to the microsecond, keep), at most ``limit``."""
    rows = read_history(uri).to_pylist()
    rows = [r for _, r in sorted(enumerate(rows), key=lambda kr: (kr[1]["finished_at"], kr[0]), reverse=True)]
    return rows[:limit] if limit else rows


def _quality(r: dict[str, Any]) -> str:
    if r.get("psnr_mean") is not None:
        return (f"PSNR {_num(r.get('psnr_input_mean'), '.2f')} -> {r['psnr_mean']:.2f} dB, "
                f"SSIM {_num(r.get('ssim_input_mean'), '.3f')} -> {_num(r.get('ssim_mean'), '.3f')}")
    spread = f", spread {r['spread_mean']:.4f}" if r.get("spread_mean") is not None else ""
    return (f"no truth: residual {_num(r.get('residual_mean'), '.4f')}, removed "
            f"{_num(r.get('removed_energy_mean'), '.4f')}{spread}")


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def runs_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of summary rows: date, run, dataset, images, errors, quality, images/s."""
    head = ("finished (UTC)", "run", "dataset", "images", "new", "errors", "quality", "images/s")
    body = [(f"{r['finished_at']:%Y-%m-%d %H:%M}", r["run_id"], _short(str(r["dataset"])), str(r["cleaned"]),
             str(r["processed"]), str(r["errors"]), _quality(r), _num(r.get("images_per_s"), ".2f")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    right = {3, 4, 5, 7}
    line = lambda cells: "  ".join(c.rjust(w) if k in right else c.ljust(w)  # noqa: E731
                                   for k, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head)] + [line(b) for b in body])
