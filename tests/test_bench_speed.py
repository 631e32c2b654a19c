"""Smoke tests of the speed and NFE benchmarks (``--quick``): they run end to end and their figures are
consistent with each other. No timing is asserted: wall-clock figures depend on the machine."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest

from pipeline.bench import nfe
from pipeline.bench.speed import default_rules
from pipeline.cli import main
from pipeline.posterior.sampler import SamplerSettings


def test_bench_speed_quick_reports_every_figure_consistently(ray_local, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--quick", "--threads", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    for key in ("overhead_ratio", "images_per_s", "ray_vs_single_ratio", "peak_memory_mb"):
        assert key in doc, key
    assert set(doc["overhead"]) == set(default_rules())
    for f in doc["overhead"].values():
        assert f["floor_s"] > 0 and f["sampler_s"] > 0 and f["ratio"] == pytest.approx(f["sampler_s"] / f["floor_s"])
        assert f["batch"] == 8 and len(f["floor_runs"]) == len(f["sampler_runs"]) == 1
    assert doc["overhead_ratio"] == doc["overhead"]["dps"]["ratio"]
    default_nfe = SamplerSettings().nfe
    assert doc["meta"]["nfe_default"] == default_nfe
    assert set(doc["images_per_s"]["by_batch"]) == {"1", "8"}
    assert set(doc["images_per_s"]["by_rule"]) == set(default_rules())
    for row in doc["throughput_rows"]:
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["seconds"])
        # the per-image cost at the default NFE is the timed steps' cost scaled to the default step count
        assert row["images_per_s_at_default"] == pytest.approx(row["images_per_s"] * row["steps"] / default_nfe)
    rv = doc["ray_vs_single"]
    assert rv["images"] == 8 and rv["shards"] == 2
    assert [len(rv["runs"][side]) for side in ("single", "ray")] == [1, 1]
    # the job's own CPU layout on the session's Ray (4 logical CPUs): 2 shards, 2 actors of 2 threads
    assert (rv["ray_actors"], rv["ray_threads_per_actor"]) == (2, 2)
    assert rv["single_span_s"] == min(r["span_s"] for r in rv["runs"]["single"])
    assert doc["ray_vs_single_ratio"] == pytest.approx(rv["ray_images_per_s"] / rv["single_images_per_s"])
    assert rv["ray_span_s"] <= rv["ray_wall_s"] and rv["single_span_s"] <= rv["single_wall_s"]
    assert doc["peak_memory_mb"]["ray_actor_rss"] > 100  # an actor holding torch and two U-Nets
    assert math.isfinite(doc["overhead_ratio"]) and "| dps |" in printed and "Ray / one process" in printed


def test_bench_nfe_quick_tunes_and_scores_each_solver_and_step_count(tmp_path):
    js, svg = tmp_path / "nfe.json", tmp_path / "nfe.svg"
    assert main(["bench", "nfe", "--quick", "--threads", "2", "--solvers", "em,ddim", "--steps", "3,5",
                 "--json", str(js), "--figure", str(svg)]) == 0
    doc = json.loads(js.read_text())
    assert [(r["curve"], r["nfe"]) for r in doc["rows"]] == [("em", 3), ("em", 5), ("ddim", 3), ("ddim", 5)]
    for r in doc["rows"]:
        # the weights are the grid's value scaled for the step count, times one of the tuned ratios
        lam = round(nfe.LAMBDA_GRID[1] * (200 / r["steps"]) ** 0.5, 3)
        assert r["lambda_x"] == lam and r["kappa_n"] in {round(lam * k, 3) for k in (0.25, 0.5, 1.0)}
        assert r["solver"] == nfe.SOLVERS[r["curve"]]["solver"] and r["n_images"] == 4
    assert set(doc["weights"]) == {"em", "ddim"} and doc["weights"]["ddim"]["5"]["eta"] == 1.0
    root = ET.parse(svg).getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2  # one line per solver
    assert doc["target"]["reference"] is None and not doc["target"]["met"]  # no 600-step run to compare with


def test_the_nfe_target_compares_the_best_cheap_solver_with_600_step_euler_maruyama():
    rows = [{"curve": "em", "steps": 600, "nfe": 600, "psnr_mean": 27.0},
            {"curve": "em", "steps": 50, "nfe": 50, "psnr_mean": 21.0},
            {"curve": "ddim", "steps": 50, "nfe": 50, "psnr_mean": 26.8},
            {"curve": "ddim", "steps": 100, "nfe": 100, "psnr_mean": 27.5}]
    t = nfe.target({"rows": rows})
    assert t["best"] == {"curve": "ddim", "steps": 50, "psnr_mean": 26.8} and t["met"]
    assert t["gap_db"] == pytest.approx(0.2)
    rows[2]["psnr_mean"] = 26.6
    assert not nfe.target({"rows": rows})["met"]
    assert not nfe.target({"rows": rows[1:]})["met"]  # no reference, no claim
