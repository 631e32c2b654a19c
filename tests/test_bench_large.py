"""``jointdiff bench large --quick``: every row of the five scenarios, finite seam ratios, figures consistent with the
per-image scores, and the seam ratio itself on images with and without a seam. No timing is asserted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.bench.large import SCENARIOS, seam_ratio
from pipeline.cli import main
from pipeline.diffusion.tiles import Tiling
from pipeline.priors import supervised_for


def test_bench_large_quick_reports_every_row_of_each_scenario(tmp_path, capsys):
    out, fig = tmp_path / "large.json", tmp_path / "large.png"
    assert main(["bench", "large", "--quick", "--threads", "2", "--json", str(out), "--figure", str(fig)]) == 0
    doc = json.loads(out.read_text())
    baselines = ["observation", "nlm", "tv", "bm3d", "inpaint"]
    samplers = {"text": ["gaussian", "joint"], "stripes": ["gaussian", "joint"],
                "unknown-alpha": ["joint-oracle", "joint-auto", "joint-fixed"], "text-serif": ["gaussian", "joint"],
                "faces": ["gaussian", "joint"]}
    noise = {sc.name: sc.noise_prior for sc in SCENARIOS}
    learned = {s: ["supervised"] if supervised_for("natural", noise[s]) else [] for s in samplers}
    assert [(r["scenario"], r["method"]) for r in doc["rows"]] == [(s, m) for s in samplers
                                                                   for m in baselines + samplers[s] + learned[s]]
    shifts = {r["scenario"]: (r["shift"], r["clean"]) for r in doc["rows"]}
    assert shifts["text-serif"] == ("noise", "natural") and shifts["faces"] == ("clean", "faces")
    assert shifts["text"] == (None, "natural")
    # the unknown-alpha photo's hidden alpha: the oracle cleans with it, the fixed row with 0.5, auto estimates it
    truth = next(s for s in SCENARIOS if s.name == "unknown-alpha").weight_of(0, "test")
    assert 0.2 <= truth <= 0.8
    assert next(p for p in doc["per_image"] if p["scenario"] == "unknown-alpha")["alpha"] == truth
    err = {r["method"]: r.get("alpha_error_median") for r in doc["rows"] if r["scenario"] == "unknown-alpha"}
    assert err["joint-oracle"] == 0 and err["joint-fixed"] == abs(0.5 - truth) and err["nlm"] is None
    assert 0 <= err["joint-auto"] <= 0.6
    if learned["unknown-alpha"]:  # the fast path's estimate, from the noise prior (the quick crop of astronaut)
        hat = next(p for p in doc["per_image"] if p["scenario"] == "unknown-alpha")["supervised alpha_hat"]
        assert err["supervised"] == pytest.approx(abs(hat - truth)) and err["supervised"] < 0.05
    for r in doc["rows"]:
        faces = r["scenario"] == "faces"  # four 32x32 faces, each one tile: no seam to measure
        assert r["n_images"] == (4 if faces else 1) and math.isfinite(r["psnr_mean"]) and 0 < r["ssim_mean"] <= 1
        assert r["seconds_per_megapixel"] >= 0 and r["peak_rss_mb"] > 0
        if r["method"] not in baselines + ["supervised"] and not faces:  # the samplers tile the 128x192 crop
            assert r["steps"] == 4 and 0.5 < r["seam_ratio"] < 2
        else:
            assert r["seam_ratio"] is None
        # the table's figure is the per-image score's mean
        per = [p[r["method"]]["psnr"] for p in doc["per_image"] if p["scenario"] == r["scenario"]]
        assert r["psnr_mean"] == np.mean(per)
    assert {(p["height"], p["width"], p["channels"]) for p in doc["per_image"]} == {(128, 192, 3), (32, 32, 1)}
    assert doc["meta"]["quick"] and doc["meta"]["steps"] == 4 and fig.stat().st_size > 0
    assert doc["meta"]["rules"] == {"text": "projection", "stripes": "dps", "unknown-alpha": "dps",
                                    "text-serif": "projection", "faces": "dps"}
    assert {(r["scenario"], r["rule"], r["final_projection"]) for r in doc["rows"] if r["rule"]} == {
        ("text", "projection", False), ("stripes", "dps", True), ("unknown-alpha", "dps", True),
        ("text-serif", "projection", False), ("faces", "dps", True)}
    # the gaussian baseline: a per-pixel prior, its weights from a grid with 0 (quick: the grid's first, 0 / 0)
    assert all((r["lambda_x"], r["kappa_n"]) == (0.0, 0.0) for r in doc["rows"] if r["method"] == "gaussian")
    # the tiling overhead: one 160x160 image in about 50 tiles against as many 32x32 images, each rule
    for rule in ("dps", "projection"):
        t = doc["tiling"][rule]
        assert 36 <= t["tiles_per_evaluation"] <= 64 and t["untiled_batch"] == round(t["tiles_per_evaluation"])
        assert math.isfinite(t["ratio"]) and t["ratio"] > 0
    printed = capsys.readouterr().out
    assert "| text | joint |" in printed and "unknown-alpha joint-auto: |alpha_hat - alpha| median" in printed
    # --methods: a subset of the rows, on the same test images (the same figures as the full run's rows)
    part = tmp_path / "part.json"
    assert main(["bench", "large", "--quick", "--threads", "2", "--scenarios", "stripes,faces", "--methods",
                 "observation,supervised", "--json", str(part)]) == 0
    sub = json.loads(part.read_text())
    assert sub["meta"]["methods"] == ["observation", "supervised"]
    assert [(r["scenario"], r["method"]) for r in sub["rows"]] == [(s, m) for s in ("stripes", "faces")
                                                                   for m in ["observation"] + learned[s]]
    full = {(r["scenario"], r["method"]): r for r in doc["rows"]}
    for r in sub["rows"]:
        assert (r["psnr_mean"], r["ssim_mean"]) == (full[r["scenario"], r["method"]]["psnr_mean"],
                                                    full[r["scenario"], r["method"]]["ssim_mean"])


def test_the_seam_ratio_sees_a_step_at_the_tile_borders_and_nothing_in_a_smooth_image():
    tiling = Tiling(64, 80, 16, 4, (3, 5))
    v, u = np.mgrid[0:64, 0:80] / 80.0
    smooth = np.sin(7 * u + 3 * v)[None]
    assert abs(seam_ratio(smooth, tiling) - 1) < 0.05
    seamed = smooth.copy()
    for y, x in tiling.origins:  # a small offset per tile, as a blend without windows would leave
        seamed[:, max(y, 0):y + 16, max(x, 0):x + 16] += 0.05 * ((y + x) % 3)
    assert seam_ratio(seamed, tiling) > 1.5
