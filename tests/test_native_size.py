"""Images of any size and colour end to end: a prior trained on patches of a folder of mixed sizes, cleaning that
keeps each image's size and channel count (grey in, grey out; RGB in, RGB out) in tiles of the priors' size,
batches formed by a pixel budget, and the size knobs that are gone refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.run.rows import Row
from pipeline.run.shard import batches
from tests.conftest import cli, train_tiny_patch_prior

SIZES = {"grey.png": (40, 30, 1), "wide.png": (21, 50, 3), "small.png": (10, 12, 3), "tile.png": (16, 16, 3)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A user's folder of images of mixed sizes and colours, ingested (``ingest`` keeps each one's size)."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("native")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w, c) in SIZES.items():
        shape = (h, w) if c == 1 else (h, w, c)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / "photos" / name)
    assert main(["ingest", str(root / "photos"), str(root / "obs"), "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def rgb_priors(folder) -> tuple[str, str]:
    """Two tiny 16x16 RGB priors trained (2 steps) on random patches of the ingested folder: `jointdiff train`
    takes a shard dataset of mixed sizes with `data.patch`."""
    return tuple(train_tiny_patch_prior(folder, name, {"source": str(folder / "obs"), "patch": 16}, 3)
                 for name in ("img", "noise"))


def test_a_prior_trains_on_random_patches_of_images_of_mixed_sizes(rgb_priors):
    card = json.loads((Path(rgb_priors[0]) / "config.json").read_text())
    assert card["unet"]["image_size"] == 16 and card["unet"]["channels"] == 3
    assert card["meta"]["n_train_images"] == len(SIZES)


def test_data_patch_and_size_must_agree():
    from pipeline.config import PriorConfig

    base = {"name": "p", "output": "x", "data": {"source": "natural", "patch": 32}}
    assert PriorConfig.model_validate(base).data.size == 32
    with pytest.raises(ValueError, match="data.patch=32 and data.size=16"):
        PriorConfig.model_validate({**base, "data": {"source": "natural", "patch": 32, "size": 16}})


def test_cleaning_keeps_each_images_size_and_colour(folder, rgb_priors, tmp_path, capsys):
    priors = ["--set", f"priors.image={rgb_priors[0]}", "--set", f"priors.noise={rgb_priors[1]}"]
    # a pixel budget of two tiles: each image is its own batch, and the large ones run two tiles per call
    proc = cli(capsys, "clean", str(folder / "obs"), str(tmp_path / "out"), *priors, "--set", "forward.alpha=0.5",
               "--set", "sampler.steps=2", "--set", "batch_pixels=512", "--run-id", "r", "--quiet")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["cleaned"], summary["errors"]) == (len(SIZES), 0)
    cli(capsys, "export", str(tmp_path / "out" / "runs" / "r"), str(tmp_path / "png"), "--quiet")
    for name, (h, w, c) in SIZES.items():
        with Image.open(tmp_path / "png" / (Path(name).stem + ".png")) as im:  # named after the file, less its .png
            assert im.size == (w, h), name
            assert len(im.getbands()) == c, (name, im.mode)


def test_batches_hold_one_size_within_the_pixel_budget():
    def row(k: int, h: int, w: int) -> Row:
        return Row(k, f"id{k}", np.zeros((3, h, w), np.float32), None, 0.5)

    rows = [row(0, 32, 32), row(1, 64, 64), row(2, 32, 32), row(3, 32, 32), row(4, 64, 64), row(5, 100, 100)]
    got = [[r.row for r in b] for b in batches(rows, max_images=32, max_pixels=2 * 32 * 32)]
    assert got == [[0, 2], [3], [1], [4], [5]]  # one size per batch; a large image alone still runs
    assert [[r.row for r in b] for b in batches(rows, max_images=1, max_pixels=10**9)] == [[0], [2], [3], [1], [4],
                                                                                            [5]]


def test_the_size_knobs_that_are_gone_are_refused_in_one_line(folder, tmp_path, capsys):
    proc = cli(capsys, "clean", str(folder / "obs"), str(tmp_path / "out"), "--set", "policy.resize=resize",
               check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "policy.resize is gone" in line and "policy.max_pixels" in line


def test_the_report_embeds_thumbnails_of_at_most_512_pixels():
    from pipeline.report import thumbnail

    assert thumbnail(np.zeros((1000, 300, 3), np.uint8)).shape == (512, 154, 3)
    assert thumbnail(np.zeros((700, 2000, 1), np.uint8)).shape == (179, 512, 1)
    small = np.arange(900, dtype=np.uint8).reshape(30, 30, 1)
    assert thumbnail(small) is small


def test_a_grey_row_cleaned_in_rgb_is_measured_in_grey():
    import torch

    from pipeline.run.shard import _truth_metrics

    g = np.random.default_rng(0).uniform(0.2, 0.7, (8, 8)).astype(np.float32)
    clean = np.repeat(g[None], 3, 0)
    d = 0.2  # colour noise that the luminance cancels: R + d, G - d * 0.299 / 0.587
    den = torch.from_numpy(np.stack([g + 0.1 + d, g + 0.1 - d * 0.299 / 0.587, g + 0.1]))[None]
    y = torch.from_numpy(clean)[None]
    grey = _truth_metrics([Row(0, "a", clean, clean, 0.5, grey=True)], den, y, "cpu")
    rgb = _truth_metrics([Row(0, "a", clean, clean, 0.5, grey=False)], den, y, "cpu")
    assert grey["psnr"][0] == pytest.approx(20.0, abs=1e-3)  # what the grey output scores: mse 0.01
    assert rgb["psnr"][0] < 19.0
    assert np.isnan(grey["ssim"][0])  # 8x8 is smaller than SSIM's 11x11 window: undefined, not an error


def test_corrupt_renders_stripes_at_each_clean_images_size(tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipeline.data.embedded import natural_photos, stripe
    from pipeline.data.shards import read_images

    cli(capsys, "corrupt", "natural", "stripes", str(tmp_path / "obs"), "--size", "native", "--channels", "3",
        "--split", "val", "--alpha", "0.3")
    ids, obs = read_images(str(tmp_path / "obs"), "observation")
    _, noise = read_images(str(tmp_path / "obs"), "noise")
    sizes = {i: p.shape[:2] for i, p in natural_photos("val")}
    assert len(ids) == len(sizes)
    for id_, y, n in zip(ids, obs, noise):
        photo, stripes = id_.split("+")
        assert y.shape[:2] == sizes[photo] and y.shape[-1] == 3  # grey `clock` too: --channels 3
        seed = int(stripes.rsplit("-", 1)[1])
        # the same stripes as the 32x32 prior saw, continued over the whole image
        assert np.abs(n[:32, :32, 0] / 255.0 - stripe(seed, 32)).max() <= 1 / 255
    assert pq.read_table(tmp_path / "obs" / "shard-00000.parquet", columns=["alpha"]).column(0).to_pylist() == \
        pytest.approx([0.3] * len(ids))
    proc = cli(capsys, "corrupt", "natural", "digits", str(tmp_path / "o2"), "--size", "native", check=False)
    assert proc.returncode == 2 and "cannot be rendered at each image's size" in proc.stderr


def test_oversize_refuses_by_default_and_downscales_when_asked():
    import io

    from pipeline.data.validate import ImagePolicy, RowError, conform, decode_any

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    refuse = ImagePolicy(max_pixels=1000)
    with pytest.raises(RowError, match=r"5,400 pixels, over the limit of 1,000 \(--set policy.max_pixels=5400"):
        decode_any(data, "x.png", refuse.decode_pixels)  # from the header, undecoded
    shrink = ImagePolicy(max_pixels=1000, oversize="downscale")
    out = conform(decode_any(data, "x.png", shrink.decode_pixels), shrink)
    assert out.shape[0] == 3 and out.shape[1] * out.shape[2] <= 1000
    assert abs(out.shape[2] / out.shape[1] - 1.5) < 0.1  # the aspect kept
    # a decompression bomb is still refused unread: at most 16 times max_pixels is decoded
    with pytest.raises(RowError, match="over the limit of 4,800"):
        decode_any(data, "x.png", ImagePolicy(max_pixels=300, oversize="downscale").decode_pixels)


def test_row_groups_are_bounded_by_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shards import write_table

    table = pa.table({"id": [str(k) for k in range(10)], "blob": [bytes(1000) * (k + 1) for k in range(10)]})
    write_table(str(tmp_path / "big.parquet"), table, row_group_bytes=5000)
    assert pq.ParquetFile(tmp_path / "big.parquet").num_row_groups >= 5
    assert pq.read_table(tmp_path / "big.parquet").equals(table)
    write_table(str(tmp_path / "small.parquet"), table)
    assert pq.ParquetFile(tmp_path / "small.parquet").num_row_groups == 1


def test_ingest_cuts_shards_by_bytes_as_well_as_by_count(tmp_path):
    from pipeline.data.ingest import IngestConfig, ingest, iter_shard_plan
    from pipeline.data.sources import Source

    sizes = [40, 40, 40, 100, 10, 10]
    plan = list(iter_shard_plan([Source(f"f{k}", "v", size=b) for k, b in enumerate(sizes)], 4, 90))
    assert [[s.id for s in chunk] for _, _, chunk in plan] == [["f0", "f1"], ["f2"], ["f3"], ["f4", "f5"]]
    src = tmp_path / "src"
    src.mkdir()
    for k in range(5):  # files of one size each
        np.save(src / f"{k}.npy", np.full((20, 30), k * 40, np.uint8))
    one = (src / "0.npy").stat().st_size
    counts = ingest(str(src), str(tmp_path / "obs"), IngestConfig(shard_bytes=2 * one + 1), progress=False)
    assert len(counts["written"]) == 3 and counts["ingested"] == 5
    # the same folder with the default bound: one shard, the other two removed as stale
    counts = ingest(str(src), str(tmp_path / "obs"), progress=False)
    assert counts["written"] == ["shard-00000.parquet"] and len(counts["removed"]) >= 2


def test_ssim_in_strips_is_the_whole_images_ssim():
    import torch

    from pipeline import metrics

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 40, 37, generator=g), torch.rand(2, 3, 40, 37, generator=g)
    whole = metrics.ssim(a, b, strip=10**6)
    for strip in (1, 7, 13):
        assert torch.allclose(metrics.ssim(a, b, strip=strip), whole, atol=1e-6)


def test_the_paper_solver_rejects_other_sizes_row_by_row(folder, rgb_priors, tmp_path, capsys):
    import pyarrow.parquet as pq

    priors = ["--set", f"priors.image={rgb_priors[0]}", "--set", f"priors.noise={rgb_priors[1]}"]
    proc = cli(capsys, "clean", str(folder / "obs"), str(tmp_path / "out"), *priors, "--set", "forward.alpha=0.5",
               "--set", "sampler.preset=paper", "--set", "sampler.steps=2", "--set", "max_rejected_fraction=1",
               "--run-id", "p", "--quiet")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["cleaned"], summary["errors"]) == (1, len(SIZES) - 1)  # tile.png is the priors' 16x16
    reasons = pq.read_table(tmp_path / "out" / "runs" / "p" / "errors").column("reason").to_pylist()
    assert all("solver runs at the priors' size (16x16) only; use sampler.solver=ddim" in r for r in reasons)
