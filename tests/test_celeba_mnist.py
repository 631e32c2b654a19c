"""``configs/celeba_mnist.yaml`` (the paper's 64x64 RGB setting) runs end to end, a few steps, on random data.

The commands run in this process (``pipeline.cli.main``: the same parsing, ``--section`` and ``--set``): four
interpreters that each import torch cost more than the 64x64 work; tests/test_cli.py runs them as subprocesses."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.config import PriorConfig, load_config
from pipeline.data.shards import write_image_shards
from pipeline.diffusion.checkpoint import load_model
from pipeline.diffusion.train import Trainer
from pipeline.training import train_settings
from tests.test_cli import ROOT

RECIPE = str(ROOT / "configs" / "celeba_mnist.yaml")


def jointdiff(capsys, *args: str) -> str:
    """``jointdiff ARGS`` run by the CLI's ``main`` in this process; fails on a non-zero exit; its standard output."""
    from pipeline.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    assert rc == 0, f"jointdiff {' '.join(args)} failed ({rc}):\n{out.err}"
    return out.out


def test_noise_prior_draws_each_digit_into_one_random_channel():
    cfg = load_config(PriorConfig, RECIPE, ["train.batch_size=64", "train.device=cpu"], section="noise_prior")
    assert cfg.unet.channels == 3 and cfg.data.grey_to_rgb == "random"
    trainer = Trainer(train_settings(cfg))
    grey = torch.rand(10, 1, 64, 64) * 2 - 1  # never exactly -1
    batch = trainer.draw_batch(grey)
    assert batch.shape == (64, 3, 64, 64)
    black = (batch == -1).flatten(2).all(2)  # (B, 3): which channels are empty
    assert (black.sum(1) == 2).all()  # the digit sits in exactly one channel
    assert set(black.float().argmin(1).tolist()) == {0, 1, 2}  # and every channel gets some


def test_celeba_mnist_recipe_trains_corrupts_and_denoises_at_64px_rgb(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_image_shards(str(tmp_path / "celeba"), [f"c{i}" for i in range(4)], rng.random((4, 3, 64, 64), np.float32))
    write_image_shards(str(tmp_path / "mnist"), [f"m{i}" for i in range(4)], rng.random((4, 1, 64, 64), np.float32))
    models = {}
    for section, data in (("image_prior", "celeba"), ("noise_prior", "mnist")):
        out = tmp_path / section
        jointdiff(capsys, "train", "--config", RECIPE, "--section", section, "--quiet",
                  "--set", f"data.source={tmp_path / data}", "--set", f"output={out}", "--set", "train.steps=2",
                  "--set", "train.batch_size=2", "--set", "train.device=cpu", "--set", "train.warmup_steps=1")
        model, _, meta = load_model(str(out / "model"))
        assert (model.config.image_size, model.config.channels) == (64, 3)
        assert 8e6 < meta["parameters"] < 10e6  # the paper's U-Nets: about 9M parameters each
        models[section] = out / "model"
    obs = tmp_path / "obs"
    jointdiff(capsys, "corrupt", str(tmp_path / "celeba"), str(tmp_path / "mnist"), str(obs), "--config", RECIPE,
              "--section", "corrupt", "--n", "3")
    table = pq.read_table(obs)
    assert table.num_rows == 3 and set(table.column("alpha").to_pylist()) == {0.5}
    noise = np.asarray(Image.open(io.BytesIO(table.column("noise").to_pylist()[0]["bytes"])))
    assert noise.shape == (64, 64, 3) and (noise.reshape(-1, 3).max(0) > 0).sum() == 1  # one random channel
    printed = jointdiff(capsys, "clean", str(obs), str(tmp_path / "out"), "--config", RECIPE, "--section", "clean",
                        "--set", f"priors.image={models['image_prior']}", "--set",
                        f"priors.noise={models['noise_prior']}", "--set", "sampler.steps=2", "--set", "device=cpu",
                        "--set", "batch_size=2", "--run-id", "r", "--quiet")
    assert json.loads(printed.strip().splitlines()[-1])["cleaned"] == 3
    cleaned = pq.read_table(tmp_path / "out" / "runs" / "r" / "cleaned")
    img = np.asarray(Image.open(io.BytesIO(cleaned.column("denoised").to_pylist()[0]["bytes"])))
    assert cleaned.num_rows == 3 and img.shape == (64, 64, 3)
