from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import ImageSet, load_embedded
from pipeline.data.shards import read_images, read_table, to_float
from pipeline.diffusion.sde import VPSDE
from pipeline.forward import make_forward
from pipeline.posterior.denoise import Denoiser, truth_metrics
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import SamplerSettings


def test_corrupt_pairs_reproducibly_and_keeps_the_truth(tmp_path):
    faces, digits = load_embedded("faces", "test"), load_embedded("digits", "test")
    obs = corrupt(faces, digits, 50, alpha=0.5, seed=7)
    again = corrupt(faces, digits, 50, alpha=0.5, seed=7)
    assert obs.ids == again.ids and np.array_equal(obs.observation, again.observation)
    assert len(set(obs.ids)) == 50
    # each of the 20 faces appears under several different digits
    under = {}
    for i in obs.ids:
        f, d = i.split("+")
        under.setdefault(f, set()).add(d)
    assert len(under) == 20 and all(len(v) >= 2 for v in under.values())
    assert np.allclose(obs.observation, 0.5 * obs.clean + 0.5 * obs.noise, atol=1e-6)
    write_observations(str(tmp_path / "obs"), obs, shard_size=20)
    ids, ys = read_images(str(tmp_path / "obs"), "observation")
    _, cleans = read_images(str(tmp_path / "obs"), "clean")
    assert ids == obs.ids and ys[0].dtype == np.uint16
    assert np.abs(np.stack([to_float(a) for a in ys]) - obs.observation).max() < 1e-4
    assert np.abs(np.stack([to_float(a) for a in cleans]) - obs.clean).max() <= 0.5 / 255 + 1e-6
    table = read_table(str(tmp_path / "obs" / "shard-00000.parquet"))
    assert table.column("alpha").to_pylist() == [0.5] * 20


def test_pairs_never_repeat_and_impossible_counts_are_refused():
    clean = ImageSet([f"c{k}" for k in range(20)], np.zeros((20, 1, 4, 4), np.float32))
    noise = ImageSet([f"n{k}" for k in range(30)], np.zeros((30, 1, 4, 4), np.float32))
    obs = corrupt(clean, noise, 600)
    assert len(set(obs.ids)) == 600
    with pytest.raises(ValueError, match="distinct"):
        corrupt(clean, noise, 601)


def test_sum_observations_leave_unit_range_and_are_stored_as_npy(tmp_path):
    faces, digits = load_embedded("faces", "test"), load_embedded("digits", "test")
    obs = corrupt(faces, digits, 4, forward="sum", seed=0)
    assert obs.observation.max() > 1.0
    write_observations(str(tmp_path / "obs"), obs)
    _, ys = read_images(str(tmp_path / "obs"), "observation")
    assert ys[0].dtype == np.float32 and np.array_equal(np.stack([to_float(a) for a in ys]), obs.observation)


def test_grey_noise_goes_into_one_random_colour_channel():
    rgb = load_embedded("patches", "test", channels=3, n=6)
    digits = load_embedded("digits", "test", channels=1)
    obs = corrupt(rgb, digits, 6, noise_channel="random", seed=1)
    lit = (obs.noise.reshape(6, 3, -1).max(2) > 0).sum(1)
    assert (lit == 1).all()
    with pytest.raises(ValueError, match="same size"):
        corrupt(rgb, ImageSet(["d"], np.zeros((1, 1, 16, 16), np.float32)), 1)


def test_denoiser_returns_mean_spread_and_reference_free_figures():
    sde = VPSDE()
    xm, nm = GaussianPrior(0.0, 0.3, sde), GaussianPrior(-0.5, 0.2, sde)
    y = torch.rand(3, 1, 16, 16)
    cfg = SamplerSettings(rule="exact-gaussian", schedule="sde", solver="euler-maruyama", steps=20, n_samples=4,
                          data_var_x=0.3, data_var_n=0.2, lambda_x=1.0, kappa_n=1.0)
    out = Denoiser(xm, nm, sde, cfg)(["a", "b", "c"], y, make_forward("blend", 3, alpha=0.5, sigma_y=0.1))
    assert out.denoised.shape == y.shape and out.uncertainty is not None and out.uncertainty.shape == y.shape
    assert (out.spread > 0).all() and out.nfe == 20 * 4 and out.backward  # per image: steps per sample
    alone = Denoiser(xm, nm, sde, cfg)(["b"], y[1:2], make_forward("blend", 1, alpha=0.5, sigma_y=0.1))
    assert torch.allclose(alone.denoised[0], out.denoised[1], atol=1e-5)
    single = Denoiser(xm, nm, sde, dataclasses.replace(cfg, n_samples=1))(["a"], y[:1], make_forward("sum", 1))
    assert single.uncertainty is None and torch.isnan(single.spread).all()
    m = truth_metrics(out.denoised, y, y)
    assert torch.isinf(m["psnr_input"]).all() and set(m) == {"psnr", "ssim", "psnr_input", "ssim_input"}


def test_sum_observations_are_cleaned_not_lost(tmp_path):
    """The sum model has no alpha (NaN in the column): every row must still be cleaned."""
    from pipeline.config import CleanConfig
    from pipeline.diffusion.checkpoint import save_model
    from pipeline.diffusion.unet import UNet, UNetConfig

    net = UNet(UNetConfig(image_size=16, base_channels=8, channel_mults=[1, 2]))
    save_model(str(tmp_path / "m"), net, VPSDE(), {"name": "tiny"})
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 3, forward="sum")
    write_observations(str(tmp_path / "obs"), obs)
    from pipeline.data.shards import read_table
    from pipeline.run.local import run_local

    cfg = CleanConfig(priors={"image": str(tmp_path / "m"), "noise": str(tmp_path / "m")},
                      forward={"name": "sum"}, sampler={"steps": 2})
    res = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False)
    assert (res["cleaned"], res["errors"]) == (3, 0)
    cleaned = tmp_path / "out" / "runs" / "r" / "cleaned" / "shard-00000.parquet"
    assert read_table(str(cleaned)).column("id").to_pylist() == obs.ids


def test_corrupt_as_png_files_writes_the_observations_a_shard_would_hold(tmp_path, capsys):
    """``--format png``: the same observations as the shards, as 8-bit PNG files named by id (a folder of images
    for ``jointdiff ingest``), and nothing else."""
    from PIL import Image

    from tests.conftest import cli

    args = ["--size", "40", "--channels", "3", "--alpha", "0.3", "--n", "3"]
    cli(capsys, "corrupt", "natural", "stripes", str(tmp_path / "shards"), *args)
    done = cli(capsys, "corrupt", "natural", "stripes", str(tmp_path / "png"), *args, "--format", "png")
    assert "as PNG files in" in done.stderr
    ids, ys = read_images(str(tmp_path / "shards"), "observation")
    assert sorted(f.name for f in (tmp_path / "png").iterdir()) == sorted(f"{i}.png" for i in ids)
    for i, y in zip(ids, ys, strict=True):
        png = np.asarray(Image.open(tmp_path / "png" / f"{i}.png"), dtype=np.float32) / 255
        assert png.shape == (40, 40, 3)
        assert np.abs(png - np.moveaxis(to_float(y), 0, -1)).max() <= 0.5 / 255 + 1e-6
