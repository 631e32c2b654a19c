"""Overlays: text layers (RGBA), the composited overlay ``y = (1 - a m) x + a m c`` from the forward model to a run
that cleans photos under text and exports the text it found as an RGBA PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.forward import make_forward
from tests.conftest import cli, train_tiny_patch_prior


def test_the_composite_blends_the_layers_colour_by_its_coverage():
    f = make_forward("composite", 2, a=[1.0, 0.5])
    x = torch.full((2, 3, 2, 2), 0.2)
    n = torch.zeros(2, 4, 2, 2)
    n[:, :3] = 0.9  # colour
    n[:, 3, 0, 0] = 1.0  # coverage: one pixel fully, one half, the rest none
    n[:, 3, 0, 1] = 0.5
    y = f.apply(x, n)
    assert y[0, :, 0, 0].tolist() == pytest.approx([0.9] * 3)  # opaque text at a = 1 hides the photo
    assert y[0, :, 0, 1].tolist() == pytest.approx([0.55] * 3)
    assert y[1, :, 0, 0].tolist() == pytest.approx([0.55] * 3)  # a = 0.5 halves every coverage
    assert torch.equal(y[:, :, 1], x[:, :, 1])  # no text: the photo as it is
    assert f.noise_channels(3) == 4 and f.noise_channels(1) == 2
    part = f.image_part(x, n)  # what is left of the photo in y: (1 - a m) x
    assert part[0, 0, 0, 0].item() == pytest.approx(0.0) and part[0, 0, 0, 1].item() == pytest.approx(0.1)


def test_the_composites_projection_explains_y_with_the_coverage_held():
    g = torch.Generator().manual_seed(0)
    f = make_forward("composite", 3, a=[1.0, 0.7, 0.3])
    y = torch.rand(3, 3, 8, 8, generator=g)
    x, n = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 4, 8, 8, generator=g)
    x2, n2 = f.project(y, x, n)
    am = torch.tensor([1.0, 0.7, 0.3])[:, None, None, None] * n2[:, 3:]
    assert torch.allclose((1 - am) * x2 + am * n2[:, :3], y, atol=1e-5)  # the model (the move may leave [0, 1])
    assert torch.equal(n2[:, 3], n[:, 3])  # the coverage is held
    # the least move: where nothing covers the photo, all of the residual goes to the photo
    n[:, 3] = 0
    x2, n2 = f.project(y, x, n)
    assert torch.allclose(x2, y, atol=1e-6) and torch.equal(n2, n)
    # with read-out noise, a residual of RMS sigma_y is left
    fs = make_forward("composite", 3, a=1.0, sigma_y=0.05)
    x3, n3 = fs.project(y, x, n)
    rms = (y - ((1 - n3[:, 3:]) * x3 + n3[:, 3:] * n3[:, :3])).pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(rms, torch.full((3,), 0.05), atol=1e-4)


def test_the_composites_derivatives_stay_bounded_when_estimates_leave_the_data_range():
    f = make_forward("composite", 1, a=0.8)
    x = torch.full((1, 3, 2, 2), 40.0, requires_grad=True)  # as Tweedie's estimates are far from t = 0
    n = torch.full((1, 4, 2, 2), -30.0)
    n[:, 3] = 25.0
    n.requires_grad_(True)
    gx, gn = torch.autograd.grad(f.apply(x, n).sum(), [x, n])
    assert gx.abs().max() <= 1 and gn.abs().max() <= 0.8 + 1e-6
    inside = torch.rand(1, 3, 2, 2), torch.rand(1, 4, 2, 2)  # in range: exactly the model
    am = 0.8 * inside[1][:, 3:]
    assert torch.allclose(f.apply(*inside), (1 - am) * inside[0] + am * inside[1][:, :3])


def test_the_composite_is_not_linear_and_says_what_cannot_use_it():
    f = make_forward("composite", 1)
    with pytest.raises(NotImplementedError, match="not linear.*sampler.rule=dps"):
        _ = f.coef_x
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"composite a must be in \(0, 1\]"):
            make_forward("composite", 1, a=bad)
    with pytest.raises(ValueError, match="RGBA noise prior"):
        f.apply(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_configs_check_the_weight_against_the_model_and_refuse_the_paper_preset_for_a_composite():
    from pipeline.config import CleanConfig, CorruptConfig

    assert CleanConfig.model_validate({"forward": {"name": "composite", "alpha": 1.0}}).forward.alpha == 1.0
    with pytest.raises(ValueError, match=r"forward.alpha=1: blend alpha must be in \(0, 1\)"):
        CleanConfig.model_validate({"forward": {"name": "blend", "alpha": 1.0}})
    with pytest.raises(ValueError, match="not linear and the paper preset"):
        CleanConfig.model_validate({"forward": {"name": "composite"}, "sampler": {"preset": "paper"}})
    assert CorruptConfig(noise="text").forward == "composite"
    assert CorruptConfig(noise="stripes").forward == "blend"


def test_a_composite_recipe_samples_with_projection_and_no_final_projection_unless_it_says_otherwise():
    from pipeline.config import CleanConfig

    s = CleanConfig.model_validate({"forward": {"name": "composite"}}).sampler
    assert (s.rule, s.final_projection) == ("projection", False)
    s = CleanConfig.model_validate({"forward": {"name": "composite"}, "sampler": {"rule": "dps"}}).sampler
    assert (s.rule, s.final_projection) == ("dps", False)  # each key on its own: the one given wins
    s = CleanConfig.model_validate({"forward": {"name": "composite"}, "sampler": {"final_projection": True}}).sampler
    assert (s.rule, s.final_projection) == ("projection", True)
    s = CleanConfig.model_validate({"forward": {"name": "blend"}}).sampler
    assert (s.rule, s.final_projection) == ("dps", True)
    # a dumped recipe (what a run records) reads back as it was
    c = CleanConfig.model_validate({"forward": {"name": "composite"}})
    assert CleanConfig.model_validate(c.model_dump(mode="json")).sampler == c.sampler


def test_text_layers_are_reproducible_antialiased_and_keep_the_held_out_family_out():
    from pipeline.data.text import HELD_OUT, TRAIN_FAMILIES, text_layer

    a, b = text_layer(7, (64, 96)), text_layer(7, (64, 96))
    assert a.shape == (4, 64, 96) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, text_layer(8, (64, 96)))
    cover = np.concatenate([text_layer(s, (96, 96))[3].ravel() for s in range(10)])
    assert cover.min() >= 0 and cover.max() <= 1
    assert ((cover > 0.05) & (cover < 0.5)).any()  # antialiased edges, not a binary mask
    assert HELD_OUT not in TRAIN_FAMILIES
    # the held-out family draws other glyphs than the training families from the same seed
    assert not np.array_equal(text_layer(3, (64, 64), families=(HELD_OUT,)), text_layer(3, (64, 64)))


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_and_alpha_pngs_round_trip(channels):
    from pipeline.data.shards import decode_image, encode_png

    rng = np.random.default_rng(0)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        img = rng.integers(0, top, (5, 7, channels), dtype=dtype)
        assert np.array_equal(decode_image(encode_png(img)), img)
    la = rng.integers(0, 255, (5, 7, 2), dtype=np.uint8)  # grey and alpha: a grey photo's text layer
    assert np.array_equal(decode_image(encode_png(la)), la)


def test_corrupt_composites_text_at_each_images_size_grey_and_rgb(tmp_path, capsys):
    from pipeline.data.embedded import natural_photos
    from pipeline.data.shards import read_images

    cli(capsys, "corrupt", "natural", "text", str(tmp_path / "obs"), "--size", "native", "--split", "val",
        "--alpha", "0.8")  # rocket is RGB, clock grey; --channels 1 makes both grey
    _, obs = read_images(str(tmp_path / "obs"), "observation")
    _, clean = read_images(str(tmp_path / "obs"), "clean")
    ids, noise = read_images(str(tmp_path / "obs"), "noise")
    sizes = {i: p.shape[:2] for i, p in natural_photos("val")}
    for id_, y, x, n in zip(ids, obs, clean, noise):
        assert y.shape[:2] == sizes[id_.split("+")[0]] and "+text-val-" in id_
        assert n.shape[-1] == 2  # grey colour and coverage
        y01, x01, n01 = y / 65535.0, x[..., None] / 255.0 if x.ndim == 2 else x / 255.0, n / 255.0
        am = 0.8 * n01[..., 1:]
        assert np.abs((1 - am) * x01 + am * n01[..., :1] - (y01[..., None] if y01.ndim == 2 else y01)).max() < 0.01
    proc = cli(capsys, "corrupt", "natural", "text", str(tmp_path / "o2"), "--size", "native", "--forward", "blend",
               check=False)
    assert proc.returncode == 2 and "--forward composite" in proc.stderr and "\n" not in proc.stderr.strip()


@pytest.fixture(scope="module")
def composite_priors(tmp_path_factory) -> tuple[str, str, Path]:
    """An RGB image prior and an RGBA text prior, 16x16, trained 2 steps (on a folder's patches and on `text`)."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("composite")
    (root / "photos").mkdir()
    rng = np.random.default_rng(1)
    for name, shape in (("wide.png", (24, 40, 3)), ("grey.png", (20, 30))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / "photos" / name)
    assert main(["ingest", str(root / "photos"), str(root / "photos-obs"), "--quiet"]) == 0
    out = [train_tiny_patch_prior(root, "img", {"source": str(root / "photos-obs"), "patch": 16}, 3),
           train_tiny_patch_prior(root, "text", {"source": "text", "size": 16, "limit": 64}, 4)]
    return out[0], out[1], root


def test_a_run_cleans_photos_under_text_and_exports_the_text_as_an_rgba_layer(composite_priors, tmp_path, capsys):
    img, text, root = composite_priors
    # data.limit: the text prior trained on the first 64 layers of its split
    assert json.loads((Path(text) / "config.json").read_text())["meta"]["n_train_images"] == 64
    cli(capsys, "corrupt", str(root / "photos-obs"), "text", str(tmp_path / "obs"), "--size", "native",
        "--channels", "3", "--alpha", "0.9")
    priors = ["--set", f"priors.image={img}", "--set", f"priors.noise={text}"]
    proc = cli(capsys, "clean", str(tmp_path / "obs"), str(tmp_path / "out"), *priors, "--set",
               "forward.name=composite", "--set", "sampler.steps=2", "--run-id", "r", "--quiet")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["cleaned"], summary["errors"]) == (2, 0)
    cli(capsys, "export", str(tmp_path / "out" / "runs" / "r"), str(tmp_path / "png"), "--noise", "--quiet")
    noise = sorted((tmp_path / "png" / "noise").glob("*.png"))
    assert len(noise) == 2
    for f in noise:
        with Image.open(f) as im:
            assert im.mode == "RGBA" and im.size in {(40, 24), (30, 20)}
    # the priors must fit the model: an RGB noise prior with the composite, an RGBA one without it
    bad = cli(capsys, "clean", str(tmp_path / "obs"), str(tmp_path / "o2"), "--set", f"priors.image={img}",
              "--set", f"priors.noise={img}", "--set", "forward.name=composite", check=False)
    assert bad.returncode == 2 and "needs 4 channels but has 3" in bad.stderr
    bad = cli(capsys, "clean", str(tmp_path / "obs"), str(tmp_path / "o3"), *priors, "--set", "forward.alpha=0.5",
              check=False)
    assert bad.returncode == 2 and "forward.name=composite" in bad.stderr


def test_the_sampler_draws_an_rgba_layer_and_ends_on_the_observation():
    from pipeline.diffusion.sde import VPSDE
    from pipeline.posterior.priors import GaussianPrior
    from pipeline.posterior.sampler import SamplerSettings, joint_sample

    sde = VPSDE()
    y = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    f = make_forward("composite", 2, a=0.8)
    for rule in ("dps", "projection"):
        out = joint_sample(GaussianPrior(0.0, 0.3, sde), GaussianPrior(0.0, 0.3, sde), sde, y, f,
                           SamplerSettings(rule=rule, steps=4, lambda_x=1.0, kappa_n=1.0), tile=16,
                           generator=torch.Generator().manual_seed(1))
        assert out.x.shape == (2, 3, 20, 28) and out.n.shape == (2, 4, 20, 28)
        am = 0.8 * out.n[:, 3:].clamp(0, 1)  # the projection explains y by the model, with the coverage held
        assert torch.allclose((1 - am) * out.x + am * out.n[:, :3], y, atol=1e-4)


def test_an_alpha_channel_is_kept_and_put_back_on_the_cleaned_image(composite_priors, tmp_path, capsys):
    img, _, _ = composite_priors
    rng = np.random.default_rng(2)
    (tmp_path / "in").mkdir()
    rgba = rng.integers(0, 255, (18, 26, 4), dtype=np.uint8)
    la = rng.integers(0, 255, (20, 17, 2), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "logo.png")
    Image.fromarray(la, "LA").save(tmp_path / "in" / "scan.png")
    cli(capsys, "ingest", str(tmp_path / "in"), str(tmp_path / "obs"), "--quiet")  # policy.alpha: keep (default)
    cli(capsys, "clean", str(tmp_path / "obs"), str(tmp_path / "out"), "--set", f"priors.image={img}", "--set",
        f"priors.noise={img}", "--set", "forward.alpha=0.5", "--set", "sampler.steps=2", "--run-id", "r", "--quiet")
    cli(capsys, "export", str(tmp_path / "out" / "runs" / "r"), str(tmp_path / "png"), "--quiet")
    from pipeline.data.shards import decode_image

    for name, src, colour_type in (("logo", rgba, 6), ("scan", la, 4)):  # PNG colour types RGBA, grey + alpha
        (f,) = (tmp_path / "png").rglob(f"{name}*.png")
        data = f.read_bytes()
        assert data[25] == colour_type, name
        out = decode_image(data)
        assert out.shape == src.shape, name
        scale = 257 if out.dtype == np.uint16 else 1  # exported at 8 or 16 bits: the same alpha
        assert np.array_equal(out[..., -1], src[..., -1].astype(out.dtype) * scale)  # the alpha as it came in
