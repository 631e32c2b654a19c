"""The supervised competitor (issue 22): pair synthesis, the matched budget, training that learns, resume and the
model folder's round trip, and evaluation at any size."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import PriorConfig
from pipeline.diffusion.checkpoint import load_model
from pipeline.diffusion.nets import NetConfig, UNet
from pipeline.diffusion.unet import count_parameters
from pipeline.forward import make_forward
from pipeline.posterior.supervised import is_supervised, matched_budget, restore, synthesize, width_for
from pipeline.training import supervised_plan, train_supervised
from tests.conftest import cli


def recipe(name: str, source: str, output: str, steps: int = 10, base: int = 8) -> PriorConfig:
    return PriorConfig.model_validate({
        "name": name, "data": {"source": source, "split": "train", "size": 16, "channels": 1},
        "unet": {"image_size": 16, "channels": 1, "base_channels": base, "channel_mults": [1, 2],
                 "attention_resolutions": []},
        "train": {"steps": steps, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 5,
                  "seed": 0, "threads": 1},
        "output": output})


def test_synthesize_is_the_forward_model_clipped():
    g = torch.Generator().manual_seed(0)
    x, n = torch.rand(4, 1, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    w = torch.tensor([0.2, 0.4, 0.6, 0.8])
    y = synthesize(x, n, "blend", w)
    assert torch.allclose(y, (1 - w[:, None, None, None]) * x + w[:, None, None, None] * n)
    assert torch.allclose(y, make_forward("blend", 4, alpha=w).apply(x, n))
    layer = torch.rand(4, 2, 8, 8, generator=g)
    assert torch.allclose(synthesize(x, layer, "composite", w), make_forward("composite", 4, a=w).apply(x, layer))


def test_matched_budget_and_width():
    # two priors of 100 and 300 parameters, 10 x 4 and 20 x 2 steps x batch: 4,000 + 12,000 = 16,000
    assert matched_budget([(10, 4, 100), (20, 2, 300)], batch_size=4, params=400) == 10
    net = NetConfig(image_size=16, base_channels=8, channel_mults=[1, 2])
    wide = width_for(net, 2 * count_parameters(UNet(net)))
    counts = {w: count_parameters(UNet(NetConfig(image_size=16, base_channels=w, channel_mults=[1, 2])))
              for w in (wide.base_channels - 1, wide.base_channels, wide.base_channels + 1)}
    target = 2 * count_parameters(UNet(net))
    assert min(counts, key=lambda w: abs(counts[w] - target)) == wide.base_channels


def test_plan_matches_the_priors_compute(tmp_path):
    image = recipe("img", "faces", str(tmp_path / "a"), steps=30)
    noise = recipe("noise", "digits", str(tmp_path / "b"), steps=90)
    plan = supervised_plan(image, noise, "blend")
    p = count_parameters(UNet(image.unet.settings()))
    assert plan["budget_parameters"] == 2 * p
    assert abs(plan["parameters"] - 2 * p) / (2 * p) < 0.1
    assert plan["steps"] == round((30 + 90) * 16 * p / (16 * plan["parameters"]))
    with pytest.raises(ValueError, match="supervised network is trained for"):
        supervised_plan(image, noise, "sum")


def test_training_learns_resumes_exactly_and_round_trips(tmp_path):
    image = recipe("img", "faces", str(tmp_path / "unused"))
    noise = recipe("noise", "digits", str(tmp_path / "unused"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = train_supervised(image, noise, "blend", a, steps=80, progress=False)
    losses = json.loads((tmp_path / "a" / "state" / "step-0000080" / "state.json").read_text())["losses"]
    # the loss goes down: the network learns to take the digits out
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, losses
    # an interrupted run resumed from its state ends with the same weights as one that was not
    part = train_supervised(image, noise, "blend", b, steps=80, progress=False, stop_after=33)
    assert part["steps"] == 33 and not (tmp_path / "b" / "model").exists()
    train_supervised(image, noise, "blend", b, steps=80, progress=False)
    ma, _, meta = load_model(a + "/model")
    mb, _, _ = load_model(b + "/model")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert is_supervised(meta) and meta["forward"] == "blend" and meta["weight_range"] == [0.2, 0.8]
    assert meta["steps"] == 80 and meta["parameters"] == count_parameters(ma)
    assert meta["heldout_loss"] is not None and meta["heldout_loss"] < losses[0]
    assert full["final_loss"] == meta["final_loss"]
    # the exported network restores better than the observation it is given
    from pipeline.data.corrupt import corrupt
    from pipeline.data.embedded import load_embedded

    obs = corrupt(load_embedded("faces", "test", 16, 1), load_embedded("digits", "test", 16, 1), 32, alpha=0.5,
                  seed=0)
    y, clean = torch.from_numpy(obs.observation), torch.from_numpy(obs.clean)
    x_hat = restore(ma, y)
    assert (x_hat - clean).pow(2).mean() < 0.5 * (y - clean).pow(2).mean()


class Identity(torch.nn.Module):
    config = NetConfig(image_size=16, channels=1, base_channels=8, channel_mults=[1, 2])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (16, 16) and torch.equal(t, torch.zeros_like(t))
        return x


def test_restore_any_size_in_tiles():
    y = torch.rand(2, 1, 37, 50, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(restore(Identity(), y), y, atol=1e-6)


def test_cli_plan_and_forward_refusal(capsys, tmp_path):
    out = cli(capsys, "train-supervised", str(tmp_path / "o"), "--image-config", "configs/prior_faces.yaml",
              "--noise-config", "configs/prior_digits.yaml", "--plan")
    assert "1,415,329 parameters" in out.stderr and "3639 steps x 64" in out.stderr
    assert not (tmp_path / "o").exists()
    bad = cli(capsys, "train-supervised", str(tmp_path / "o"), "--image-config", "configs/prior_faces.yaml",
              "--noise-config", "configs/prior_digits.yaml", "--forward", "sum", check=False)
    assert bad.returncode == 2 and "--forward sum" in bad.stderr and "Traceback" not in bad.stderr
