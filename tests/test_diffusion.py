"""U-Net shapes, DSM loss, EMA, checkpoints, and resumable training."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.diffusion.checkpoint import CheckpointError, load_model, save_model
from pipeline.diffusion.ema import EMA
from pipeline.diffusion.losses import heldout_loss
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.train import Trainer, fit
from pipeline.diffusion.unet import UNet, UNetConfig
from pipeline.training import to_network, train_prior, train_settings
from tests.conftest import tiny_config


@pytest.mark.parametrize("size,channels,mults,attn", [
    (16, 1, [1, 2], [8]), (32, 3, [1, 2, 2], []), (64, 3, [1, 2, 2, 2], [16]), (256, 1, [1, 1, 2, 2, 2, 2], []),
])
def test_unet_shapes(size, channels, mults, attn):
    cfg = UNetConfig(image_size=size, channels=channels, base_channels=8, channel_mults=mults,
                     attention_resolutions=attn)
    net = UNet(cfg)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape


@pytest.mark.parametrize("bad", [{"image_size": 48}, {"image_size": 8}, {"image_size": 512}, {"channels": 2},
                                 {"image_size": 16, "channel_mults": [1, 2, 2, 2]}, {"dropuot": 0.1}])
def test_unet_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        UNetConfig(**bad)


def test_dsm_loss_decreases_on_tiny_run(tmp_path):
    from pipeline.data.embedded import load_embedded

    cfg = tiny_config(str(tmp_path / "run"), steps=30, checkpoint_every=1000)  # 30 steps reach ~0.26
    test = to_network(torch.from_numpy(load_embedded("digits", "val", 16, 1, n=64).images))
    trainer = Trainer(train_settings(cfg))
    before = heldout_loss(trainer.model, trainer.sde, test)
    data = to_network(torch.from_numpy(load_embedded("digits", "train", 16, 1).images))
    fit(trainer, data, cfg.output)
    after = heldout_loss(trainer.model, trainer.sde, test)
    assert before > 0.9  # zero-initialised output layer: e_theta = 0, loss = E[e^2] = 1
    assert after < 0.75 * before, (before, after)


def test_ema_update_is_exact():
    # decay 0.5 and integer steps: every value is exact in float32, so the check is too (with 0.9 / 0.1 it
    # passed or failed with the random initial weights: 1 - 0.9 is not 0.1 in binary)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5, warmup=False)
    start = [p.detach().clone() for p in net.parameters()]
    expected = [p.clone() for p in start]
    for k in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(float(k + 1))
        ema.update(net)
        expected = [0.5 * e + 0.5 * p.detach() for e, p in zip(expected, net.parameters())]
    for e, p in zip(expected, ema.model.parameters()):
        assert torch.equal(e, p)
    warm = EMA(net, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)
    warm.update(net)
    assert warm.current_decay() == pytest.approx(2 / 11)


def _tiny_model() -> UNet:
    torch.manual_seed(3)
    net = UNet(UNetConfig(image_size=16, base_channels=8, channel_mults=[1, 2], attention_resolutions=[8]))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    net = _tiny_model()
    save_model(str(tmp_path / "m"), net, VPSDE(beta_max=15.0), {"name": "x"})
    loaded, sde, meta = load_model(str(tmp_path / "m"))
    assert sde == VPSDE(beta_max=15.0) and meta == {"name": "x"}
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b) and a.dtype == b.dtype
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    assert torch.equal(net(x, torch.rand(2).fill_(0.3)), loaded(x, torch.rand(2).fill_(0.3)))


def test_pickled_checkpoint_is_refused(tmp_path):
    net = _tiny_model()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(tmp_path / "model.pt"))
    save_model(str(tmp_path / "m"), net, VPSDE())
    torch.save(net.state_dict(), tmp_path / "m" / "weights.safetensors")  # a pickle under the right name
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(tmp_path / "m"))


def test_mismatched_config_is_refused_with_a_clear_message(tmp_path):
    save_model(str(tmp_path / "m"), _tiny_model(), VPSDE())
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["unet"]["base_channels"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match the architecture") as err:
        load_model(str(tmp_path / "m"))
    assert "differ in shape" in str(err.value)
    cfg["unet"]["base_channels"] = 8
    cfg["unet"]["attention_resolutions"] = []
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="the config does not build"):
        load_model(str(tmp_path / "m"))


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    straight = tiny_config(str(tmp_path / "a"))
    summary = train_prior(straight, progress=False)
    assert summary["steps"] == 10 and not summary["resumed"]

    resumed = tiny_config(str(tmp_path / "b"))
    first = train_prior(resumed, progress=False, stop_after=7)  # killed after step 7; last state at 6
    assert first["steps"] == 7
    second = train_prior(resumed, progress=False)
    assert second["resumed"] and second["start_step"] == 6 and second["steps"] == 10

    a, _, meta_a = load_model(str(tmp_path / "a" / "model"))
    b, _, meta_b = load_model(str(tmp_path / "b" / "model"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert meta_a["steps"] == meta_b["steps"] == 10
    assert meta_a["heldout_loss"] == pytest.approx(meta_b["heldout_loss"])


def test_resume_refuses_a_different_architecture(tmp_path):
    train_prior(tiny_config(str(tmp_path / "a")), progress=False, stop_after=3)
    other = tiny_config(str(tmp_path / "a"))
    other = other.model_copy(update={"unet": other.unet.model_copy(update={"base_channels": 16})})
    with pytest.raises(CheckpointError, match="different unet"):
        train_prior(other, progress=False)
    other_sde = tiny_config(str(tmp_path / "a"))
    other_sde = other_sde.model_copy(update={"sde": other_sde.sde.model_copy(update={"beta_max": 10.0})})
    with pytest.raises(CheckpointError, match="different sde"):
        train_prior(other_sde, progress=False)


def test_resume_with_dropout_and_flips_matches_model_ema_and_optimizer(tmp_path):
    """The faces config draws dropout masks (global RNG) and flips (trainer generator): both must resume."""
    def cfg(out):
        c = tiny_config(out)
        return c.model_copy(update={"unet": c.unet.model_copy(update={"dropout": 0.1}),
                                    "data": c.data.model_copy(update={"hflip": True})})
    from pipeline.data.embedded import load_embedded

    data = to_network(torch.from_numpy(load_embedded("digits", "train", 16, 1).images))
    a = Trainer(train_settings(cfg(str(tmp_path / "a"))))
    fit(a, data, str(tmp_path / "a"))
    b = Trainer(train_settings(cfg(str(tmp_path / "b"))))
    fit(b, data, str(tmp_path / "b"), stop_after=4)  # last state at step 3
    torch.manual_seed(123)  # a fresh process would not share the global RNG state
    b2 = Trainer(train_settings(cfg(str(tmp_path / "b"))))
    fit(b2, data, str(tmp_path / "b"))
    assert b2.step_count == a.step_count == 10
    for x, y in zip(a.model.state_dict().values(), b2.model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(a.ema.state_dict().values(), b2.ema.state_dict().values()):
        assert torch.equal(x, y)
    sa, sb = a.opt.state_dict()["state"], b2.opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_a_torn_latest_pointer_falls_back_to_the_newest_complete_state(tmp_path):
    cfg = tiny_config(str(tmp_path / "a"))
    train_prior(cfg, progress=False, stop_after=7)  # states at steps 3 and 6
    (tmp_path / "a" / "state" / "latest.json").write_text('{"step": 6, "di')  # killed mid-write
    t = Trainer(train_settings(cfg))
    assert t.load_state(cfg.output) and t.step_count == 6


def test_memorisation_report_flags_copies():
    from pipeline.data.embedded import load_embedded
    from pipeline.training import memorisation_report, nearest_distances

    train = torch.from_numpy(load_embedded("digits", "train", 16, 1).images)
    copies = train[[5, 17, 300]]
    d, idx = nearest_distances(copies, train)
    assert torch.allclose(d, torch.zeros(3), atol=1e-6) and idx.tolist() == [5, 17, 300]
    report, nearest = memorisation_report(copies, "digits", 16, 1)
    assert report["samples_max"] < 1e-6 < report["test_min"]  # copies sit far closer than unseen digits
    assert torch.equal(nearest, copies)
    noise = torch.rand(4, 1, 16, 16)
    far, _ = memorisation_report(noise, "digits", 16, 1)
    assert far["samples_min"] > far["test_median"]


def test_random_shift_translates_each_image_by_its_own_offset():
    from pipeline.diffusion.train import _random_shift

    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = _random_shift(x.repeat(20, 1, 1, 1), 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for i in range(out.shape[0]):
        src = padded[i % 2]
        match = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], src[:, dy:dy + 6, dx:dx + 6])]
        assert len(match) == 1  # a pure translation of its own image, nothing else
        offsets.add(match[0])
    assert len(offsets) > 5  # and the offsets vary
