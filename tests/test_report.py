"""Run reports, the run history and the dashboard queries, on small real runs (tiny priors, few steps).

The runs are made once for the module in one output root: run A over 10 observations in 4 shards (one
broken PNG, ground truth, 2 posterior samples so there is an uncertainty image), run B over 4
observations without ground truth, and run C over A's input again with another sampler setting (a new
run id). Expected numbers are computed here from the Parquet files read with pyarrow, not from the
code under test.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import CleanConfig, SamplerConfig
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded
from pipeline.data.shards import read_table
from pipeline.data.validate import ERRORS_SCHEMA
from pipeline.report import (
    DASHBOARD_QUERIES,
    PER_GROUP,
    RunData,
    dashboard_sql,
    pick_images,
    render_report,
    svg_histogram,
    svg_lines,
    write_report,
)
from pipeline.run.local import run_local
from tests.conftest import cli
from tests.test_clean_job import _observations

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("JOINTDIFF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def _cfg(priors, steps: int, n_samples: int = 1) -> CleanConfig:
    return CleanConfig(priors={"image": priors[0], "noise": priors[1]},
                       sampler=SamplerConfig(steps=steps, n_samples=n_samples), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def runs(tiny_priors, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    out = root / "out"
    _observations(str(root / "obs-a"), n=10, shard_size=3)  # shard 0 row 1 is a truncated PNG
    a = run_local(str(root / "obs-a"), str(out), _cfg(tiny_priors, 3, n_samples=2), progress=False)
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 4, seed=1)
    write_observations(str(root / "obs-b"), obs, shard_size=2)
    for shard in ("shard-00000.parquet", "shard-00001.parquet"):  # a user's bucket: no ground truth
        path = root / "obs-b" / shard
        pq.write_table(read_table(str(path)).drop_columns(["clean", "noise"]), path)
    b = run_local(str(root / "obs-b"), str(out), _cfg(tiny_priors, 3), progress=False)
    c = run_local(str(root / "obs-a"), str(out), _cfg(tiny_priors, 2), progress=False)
    assert len({a["run_id"], b["run_id"], c["run_id"]}) == 3
    return {"out": out, "a": a, "b": b, "c": c}


class _Dom(HTMLParser):
    """Counts what the report shows: panel images by kind, plots by kind, error-table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.panels: list[str] = []
        self.plots: list[str] = []
        self.error_rows = 0
        self.external: list[str] = []
        self.groups: list[str] = []
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.panels.append(a.get("data-panel"))
            if not (a.get("src") or "").startswith("data:image/png;base64,"):
                self.external.append(a.get("src"))
        elif tag == "svg" and "plot" in (a.get("class") or ""):
            self.plots.append(a["data-plot"])
        elif tag in ("script", "link", "iframe"):
            self.external.append(tag)
        elif tag == "table":
            self._table = a.get("class")
            if a.get("data-group"):
                self.groups.append(a["data-group"])
        elif tag == "tr" and self._table == "errors":
            self.error_rows += 1


def _parse(text: str) -> _Dom:
    dom = _Dom()
    dom.feed(text)
    dom.error_rows = max(dom.error_rows - 1, 0)  # the header row
    return dom


def _shown(n: int, per_group: int = PER_GROUP) -> tuple[int, list[str]]:
    """Images shown for ``n`` cleaned ones, all ranked, and the groups: one group of all of them when
    they fit in one; else top and bottom min(per_group, n // 2) each and a sample of the rest."""
    if n <= per_group:
        return n, ["all"]
    k = min(per_group, n // 2)
    rest = min(per_group, n - 2 * k)
    return 2 * k + rest, ["best", "worst"] + (["random"] if rest else [])


def _expected(run_uri: Path) -> dict:
    """What the report of a run must show, from its Parquet files: the images of the groups (no image
    in two groups, see :func:`_shown`), the panels present, the plots and the error rows."""
    metrics = pq.read_table(run_uri / "metrics").to_pylist()
    errors = sum(pq.read_metadata(p).num_rows for p in (run_uri / "errors").glob("*.parquet"))
    cleaned = pq.read_table(run_uri / "cleaned")
    truth = any(m["psnr"] is not None for m in metrics)
    panels = ["observation", "denoised", "noise_estimate"]
    panels += ["uncertainty"] if "uncertainty" in cleaned.column_names else []
    panels += ["clean"] if truth else []
    shown, groups = _shown(len(metrics))
    if truth:
        plots = ["psnr-hist", "ssim-hist", "psnr-shard", "ssim-shard"]
    else:
        def has(f: str) -> bool:  # the supervised network's rows have neither residual nor spread
            return any(m[f] is not None and np.isfinite(m[f]) for m in metrics)

        plots = (["residual-hist"] if has("residual") else []) + ["removed_energy-hist"]
        plots += ["spread-hist"] if has("spread") else []
        plots.append("reference-free-shard")
    return {"images": shown * len(panels), "panels": {p: shown for p in panels}, "plots": plots,
            "errors": errors, "cleaned": len(metrics), "groups": groups}


def _run_dir(runs, name: str) -> Path:
    return runs["out"] / "runs" / runs[name]["run_id"]


def test_the_report_shows_every_group_panel_plot_and_error_of_the_run(runs):
    run = _run_dir(runs, "a")
    where = write_report(str(run))
    assert where == f"{run}/report.html"
    text = Path(where).read_text()
    dom, want = _parse(text), _expected(run)
    assert (want["cleaned"], want["errors"]) == (9, 1)  # the broken PNG is the one error
    assert len(dom.panels) == want["images"] and {p: dom.panels.count(p) for p in set(dom.panels)} == want["panels"]
    assert dom.plots == want["plots"] and dom.error_rows == want["errors"] and dom.external == []
    assert dom.groups == want["groups"] == ["best", "worst", "random"]
    assert "truncated" in text or "cannot decode" in text  # the error's reason is in the table
    assert f"{runs['a']['images_per_s']:.3f}" in text and runs["a"]["config_hash"] in text


def test_the_report_opens_in_headless_chromium_without_console_errors(runs, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("JOINTDIFF_REQUIRE_CHROMIUM"):
            pytest.fail(f"JOINTDIFF_REQUIRE_CHROMIUM is set (CI) but there is no Chromium at {CHROMIUM}; "
                        ".ci/run installs Debian's chromium package")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; CI installs it and the test must run)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    run = _run_dir(runs, "a")
    report = Path(write_report(str(run), str(tmp_path / "a.html")))
    want = _expected(run)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="jointdiff-chromium-", dir=tmp_path), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(report.as_uri(), wait_until="load")
            seen = page.evaluate("""() => ({
                images: document.querySelectorAll('img.panel').length,
                decoded: [...document.querySelectorAll('img.panel')]
                         .filter(i => i.complete && i.naturalWidth > 0).length,
                plots: [...document.querySelectorAll('svg.plot')].map(s => s.dataset.plot),
                drawn: [...document.querySelectorAll('svg.plot')].filter(s => s.getBBox().width > 0
                        && s.querySelectorAll('polyline.series').length > 0).length,
                errors: document.querySelectorAll('table.errors tr').length - 1,
                groups: [...document.querySelectorAll('table.grid')].map(t => t.dataset.group)})""")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert seen["images"] == seen["decoded"] == want["images"]
    assert seen["plots"] == want["plots"] and seen["drawn"] == len(want["plots"])
    assert seen["errors"] == want["errors"] and seen["groups"] == want["groups"] == ["best", "worst", "random"]
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=np.float64)
    assert shot.shape[0] > 900 and shot.std() > 20, f"screenshot looks blank: std {shot.std():.1f}"


def test_a_run_without_ground_truth_shows_the_reference_free_figures(runs):
    run = _run_dir(runs, "b")
    text = Path(write_report(str(run))).read_text()
    dom, want = _parse(text), _expected(run)
    assert want["plots"] == ["residual-hist", "removed_energy-hist", "reference-free-shard"]  # one sample: no spread
    assert dom.plots == want["plots"] and "clean" not in dom.panels and len(dom.panels) == want["images"]
    assert "reference-free figures instead of PSNR/SSIM" in text and "PSNR per image" not in text
    # 4 images: one group of all of them, named by the figure that orders them, never best or worst
    assert dom.groups == want["groups"] == ["all"] and "All images, by residual, lowest first" in text
    assert "Best" not in text and "Worst" not in text
    residual = np.mean(pq.read_table(run / "metrics").column("residual").to_numpy())
    assert f"{residual:.4f}" in text


def test_jointdiff_runs_lists_the_history_newest_first(runs, capsys):
    out = runs["out"]
    table = cli(capsys, "runs", str(out)).stdout.splitlines()
    assert table[0].split()[:3] == ["finished", "(UTC)", "run"] and len(table) == 4
    # newest first: the files' names start with the time they were written, to the microsecond
    history = [pq.read_table(p).to_pylist()[0] for p in sorted((out / "summary").glob("*.parquet"), reverse=True)]
    assert [line.split()[2] for line in table[1:]] == [r["run_id"] for r in history]
    by_run = {line.split()[2]: line for line in table[1:]}
    a, b = runs["a"], runs["b"]
    assert f"PSNR {a['psnr_input_mean']:.2f} -> {a['psnr_mean']:.2f} dB" in by_run[a["run_id"]]
    assert f"no truth: residual {b['residual_mean']:.4f}, removed {b['removed_energy_mean']:.4f}" in by_run[b["run_id"]]
    assert " 9 " in by_run[a["run_id"]] and by_run[a["run_id"]].split()[-1] == f"{a['images_per_s']:.2f}"
    rows = json.loads(cli(capsys, "runs", str(out / "summary"), "--json", "--limit", "2").stdout)
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in history[:2]]
    assert rows[0]["inputs"] == history[0]["inputs"]


def test_missing_runs_and_histories_are_clear_errors(tmp_path, capsys):
    for args in (("report", str(tmp_path / "out" / "runs" / "nope")), ("runs", str(tmp_path / "nothing"))):
        proc = cli(capsys, *args, check=False)
        assert proc.returncode == 1 and args[1] in proc.stderr and "Traceback" not in proc.stderr


def test_the_dashboard_queries_match_the_per_image_metrics(runs):
    import duckdb

    out = runs["out"]
    page = (ROOT / "docs" / "how-to" / "dashboards.md").read_text()
    for sql in DASHBOARD_QUERIES.values():
        assert sql in page  # the dashboards page shows exactly what is tested
    # independently: every metrics and errors file, read with pyarrow, grouped here
    metrics = [r for p in sorted(out.glob("runs/*/metrics/*/*.parquet")) for r in pq.read_table(p).to_pylist()]
    errors = [r for p in sorted(out.glob("runs/*/errors/*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(metrics) == 9 + 4 + 9 and len(errors) == 2

    trend = duckdb.sql(dashboard_sql("psnr_trend_per_day", str(out))).fetchall()
    days = sorted({m["started_at"].astimezone(dt.timezone.utc).date() for m in metrics})
    assert [t[0] for t in trend] == days
    for day, images, with_truth, psnr_in, psnr, ssim, residual, removed in trend:
        rows = [m for m in metrics if m["started_at"].astimezone(dt.timezone.utc).date() == day]
        truth = [m for m in rows if m["psnr"] is not None]
        assert (images, with_truth) == (len(rows), len(truth))
        for got, col, among in ((psnr_in, "psnr_input", truth), (psnr, "psnr", truth), (ssim, "ssim", truth),
                                (residual, "residual", rows), (removed, "removed_energy", rows)):
            assert got == pytest.approx(np.mean([m[col] for m in among]), rel=1e-9), col

    rates = duckdb.sql(dashboard_sql("error_rate_per_dataset", str(out))).fetchall()
    datasets = sorted({m["dataset"] for m in metrics} | {e["dataset"] for e in errors})
    assert [r[0] for r in rates] == datasets and len(datasets) == 2
    for dataset, rows, n_errors, rate in rates:
        cleaned = sum(m["dataset"] == dataset for m in metrics)
        rejected = sum(e["dataset"] == dataset for e in errors)
        assert (rows, n_errors) == (cleaned + rejected, rejected) and rate == pytest.approx(rejected / rows)
    assert dict((r[0], r[2]) for r in rates)[runs["b"]["dataset"]] == 0  # the no-truth dataset had no bad row


def test_a_report_of_a_run_in_an_s3_bucket_lands_in_the_bucket(s3, tiny_priors, capsys):
    from pipeline.data.storage import open_fs

    bucket, _ = s3
    _observations(f"{bucket}/obs", n=4, shard_size=2)
    summary = run_local(f"{bucket}/obs", f"{bucket}/out", _cfg(tiny_priors, 2), progress=False)
    run = summary["output"]
    assert run.startswith(f"{bucket}/out/runs/")
    proc = cli(capsys, "report", run, "--per-group", "2")  # the AWS variables of the fixture reach the CLI
    assert proc.stdout.strip() == f"{run}/report.html"
    fs, _ = open_fs(bucket)
    text = fs.cat_file(f"{run.removeprefix('s3://')}/report.html").decode()
    dom = _parse(text)
    # 3 cleaned, 2 per group: the best, the worst and the third in the sample, each once; observation (read
    # from the bucket's input), cleaned, noise estimate, truth
    assert dom.groups == ["best", "worst", "random"]
    assert len(dom.panels) == 3 * 4 and dom.panels.count("observation") == 3 and dom.error_rows == 1
    assert dom.plots == ["psnr-hist", "ssim-hist", "psnr-shard", "ssim-shard"]


def _synthetic_run(n: int, truth: bool, errors: list[dict] | None = None) -> RunData:
    """A run's tables without its files (the report then shows n/a for the panels it cannot read)."""
    rng = np.random.default_rng(n)
    metrics = pa.table({"shard": ["shard-00000.parquet"] * n, "row": list(range(n)),
                        "id": [f"img-{k}" for k in range(n)],
                        "psnr": rng.uniform(10, 30, n) if truth else pa.nulls(n, pa.float64()),
                        "psnr_input": rng.uniform(5, 10, n) if truth else pa.nulls(n, pa.float64()),
                        "ssim": rng.uniform(0, 1, n) if truth else pa.nulls(n, pa.float64()),
                        "ssim_input": rng.uniform(0, 1, n) if truth else pa.nulls(n, pa.float64()),
                        "residual": rng.uniform(0, 0.1, n), "spread": pa.nulls(n, pa.float64()),
                        "removed_energy": rng.uniform(0, 0.5, n)}) if n else None
    return RunData("memory://nowhere/runs/r", "r", "memory://nowhere", metrics,
                   pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA) if errors else None, [])


@pytest.mark.parametrize("truth", [True, False])
def test_image_groups_never_share_an_image_and_without_truth_are_named_by_the_residual(truth):
    for n in (1, 5, 8, 9, 12, 16, 20, 30):
        picked = pick_images(_synthetic_run(n, truth))
        keys = [(r["shard"], r["row"]) for rows in picked.values() for r in rows]
        assert len(keys) == len(set(keys)) == _shown(n)[0], n  # disjoint, and as many as _shown says
        names = ["all"] if n <= PER_GROUP else (["best", "worst"] if truth else ["lowest-residual", "highest-residual"])
        assert list(picked)[:len(names)] == names and set(picked) - set(names) <= {"random"}
        key, sign = ("psnr", -1) if truth else ("residual", 1)
        first = list(picked.values())[0]
        assert [sign * r[key] for r in first] == sorted(sign * r[key] for r in first)  # best (lowest) first
        if n in (5, 12):  # the whole report (it tries, and fails, to read the images: a few seconds)
            text = render_report(_synthetic_run(n, truth))
            assert truth or ("Best" not in text and "Worst" not in text and "best" not in text), n
            assert not truth or ("Best by PSNR" in text) == (n > PER_GROUP)
            assert truth or ("Lowest residual" in text and "Highest residual" in text) == (n > PER_GROUP)


def _y_tick_labels(svg: str) -> list[str]:
    return re.findall(r'<text x="[\d.]+" y="[\d.]+" text-anchor="end" font-size="10">([^<]*)</text>', svg)


def test_count_axes_have_whole_number_ticks():
    for values in ([0.5], [0.1, 0.9], [0.1, 0.2, 0.9], list(np.linspace(0, 1, 7))):
        svg = svg_histogram("x-hist", "t", "x", {"a": values, "b": values[:1]})
        labels = _y_tick_labels(svg)
        assert labels and all(float(v) == int(float(v)) for v in labels), labels
        assert float(labels[-1]) <= max(1, len(values))


def _legend_boxes(svg: str) -> tuple[list[tuple[float, float, float, float]], float]:
    """Each legend entry's box (swatch and its text at 6 px per character) and the plot frame's top."""
    frame_top = float(re.search(r'<rect[^>]*y="([\d.]+)"[^>]*stroke="#888"', svg).group(1))
    boxes = [(float(x), float(y), float(x) + 14 + 6 * len(html.unescape(name)), float(y) + 10)
             for x, y, name in re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="10" height="10"[^>]*/>'
                                          r'<text[^>]*>([^<]*)</text>', svg)]
    return boxes, frame_top


def test_legends_sit_above_the_plot_and_never_overlap():
    names = ["residual (RMS)", "removed-noise energy", "posterior spread"]
    plots = [svg_lines("s", "mean per shard", "mean", ["shard-00000.parquet", "shard-00001.parquet"],
                       {n: [0.1 * k, 0.2 * k] for k, n in enumerate(names, 1)}),
             svg_histogram("h", "per image", "PSNR", {"observation": [10, 11, 12], "cleaned": [20, 21, 30]}),
             svg_lines("l", "long", "y", ["a"], {f"a rather long series name number {k}": [k] for k in range(4)})]
    for svg in plots:
        boxes, frame_top = _legend_boxes(svg)
        assert len(boxes) >= 2
        for k, a in enumerate(boxes):
            assert a[3] <= frame_top and a[2] <= 420, (a, frame_top)  # above the plot frame, inside the figure
            for b in boxes[k + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_an_unreadable_shard_is_one_error_row_marked_whole_shard():
    errors = [{"run_id": "r", "dataset": "d", "shard": "shard-00003.parquet", "row": -1, "id": None, "stage": "read",
               "reason": "the shard cannot be read: not Parquet"},
              {"run_id": "r", "dataset": "d", "shard": "shard-00000.parquet", "row": 1, "id": "x1", "stage": "decode",
               "reason": "truncated"}]
    text = render_report(_synthetic_run(2, True, errors))
    table = text[text.index('<table class="errors">'):]
    table = table[:table.index("</table>")]
    assert "None" not in table and ">-1<" not in table
    assert "<td><i>whole shard</i></td><td>&mdash;</td><td>read</td>" in table
    assert "<td class=num>1</td><td>x1</td>" in table
    assert "could not be read at all" in text and "row = -1" in text
