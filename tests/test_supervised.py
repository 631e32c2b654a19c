"""The supervised competitor (issue 22): pair synthesis, the matched budget, training that learns, resume and the
model folder's round trip, and evaluation at any size."""

from __future__ import annotations

import json

import numpy as np
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
    # the exported weights are the checkpoint with the lowest validation loss (every 5 steps and the last), the
    # same curve in the run that was interrupted and resumed
    curve = meta["val_curve"]
    assert [c[0] for c in curve] == list(range(5, 81, 5)) and curve == load_model(b + "/model")[2]["val_curve"]
    assert meta["selected_step"] == min(curve, key=lambda c: c[1])[0] and meta["val_loss"] == min(c[1] for c in curve)
    from pipeline.diffusion.checkpoint import read_tensors

    best = read_tensors(a + f"/best/ema-{meta['selected_step']:07d}.safetensors")
    assert all(torch.equal(best[k], v) for k, v in ma.state_dict().items())
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


# --- the fast path and the router (sampler.path fast / routed) -------------------------------------------

@pytest.fixture(scope="module")
def routed_setup(tiny_priors, tmp_path_factory):
    """A tiny supervised network for the tiny priors' pair, calibrated with them; 8 observations in 2 shards."""
    from pipeline.data.corrupt import corrupt, write_observations
    from pipeline.data.embedded import load_embedded

    root = tmp_path_factory.mktemp("routed")
    image = recipe("img", "faces", str(root / "unused"))
    noise = recipe("noise", "digits", str(root / "unused"))
    train_supervised(image, noise, "blend", str(root / "sup"), steps=20, progress=False, route_priors=tiny_priors)
    obs = str(root / "obs")
    write_observations(obs, corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 8,
                                    alpha=0.5, seed=0), shard_size=4)
    return str(root / "sup" / "model"), obs


def _run(tiny_priors, sup, obs, out, path, quantile=0.5, batch_size=4, run_id=None):
    from pipeline.config import CleanConfig, SamplerConfig
    from pipeline.run.local import run_local

    cfg = CleanConfig(priors={"image": tiny_priors[0], "noise": tiny_priors[1], "supervised": sup},
                      sampler=SamplerConfig(steps=3, path=path, route_quantile=quantile), batch_size=batch_size,
                      device="cpu")
    run_id = run_id or path
    summary = run_local(obs, out, cfg, run_id=run_id, progress=False)
    import pyarrow.parquet as pq

    rows = pq.read_table(f"{out}/runs/{run_id}/cleaned").to_pylist()
    metrics = pq.read_table(f"{out}/runs/{run_id}/metrics").to_pylist()
    return summary, {r["id"]: r for r in rows}, {r["id"]: r for r in metrics}


def test_a_state_of_another_pair_is_refused_and_a_new_run_starts_its_own_selection(tmp_path, capsys):
    image = recipe("img", "faces", str(tmp_path / "unused"))
    noise = recipe("noise", "digits", str(tmp_path / "unused"))
    out = str(tmp_path / "o")
    train_supervised(image, noise, "blend", out, steps=10, progress=False)
    other = recipe("noise", "stripes", str(tmp_path / "unused"))
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"its training state is of another noise"):
        train_supervised(image, other, "blend", out, steps=20, progress=False)
    # the state deleted by hand: a new run, whose selection is its own (the old best is not kept)
    import shutil

    shutil.rmtree(tmp_path / "o" / "state")
    (tmp_path / "o" / "best" / "ema-9999999.safetensors").write_bytes(b"stale")
    train_supervised(image, noise, "blend", out, steps=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "o" / "best").iterdir() if p.name.endswith(".safetensors")) == [
        f"ema-{s:07d}.safetensors" for s in sorted({c[0] for c in load_model(out + "/model")[2]["val_curve"]
                                                     if c[1] == min(d[1] for d in load_model(out + "/model")[2][
                                                         "val_curve"] if d[0] <= c[0])})]


def _pixels(cell: dict) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(cell["bytes"])), dtype=np.float64) / 65535


def test_the_card_holds_the_routers_calibration(routed_setup, tiny_priors):
    _, _, meta = load_model(routed_setup[0])
    route = meta["route"]
    assert (route["image_prior"], route["noise_prior"]) == tuple(tiny_priors) and route["n_pairs"] == 256
    q = [route["quantiles"][k] for k in ("0.5", "0.8", "0.9", "0.95", "0.99")]
    assert q == sorted(q) and q[0] < q[-1] and route["x_std"] > 0 and route["n_std"] > 0


def test_routed_cleans_every_row_once_and_records_the_path_that_cleaned_it(routed_setup, tiny_priors, tmp_path):
    sup, obs = routed_setup
    out = str(tmp_path / "out")
    s_joint, joint, _ = _run(tiny_priors, sup, obs, out, "joint")
    s_fast, fast, _ = _run(tiny_priors, sup, obs, out, "fast")
    s_routed, routed, metrics = _run(tiny_priors, sup, obs, out, "routed")
    assert s_routed["cleaned"] == s_fast["cleaned"] == s_joint["cleaned"] == 8 and len(routed) == 8
    assert set(routed) == set(joint) == set(fast) == set(metrics)
    assert {r["path"] for r in joint.values()} == {"joint"} and {r["path"] for r in fast.values()} == {"fast"}
    assert all(r["nfe"] == 1 and r["route_score"] is None for r in fast.values())
    _, _, meta = load_model(sup)
    threshold = meta["route"]["quantiles"]["0.5"]
    paths = {i: r["path"] for i, r in routed.items()}
    assert set(paths.values()) == {"fast", "joint"}, paths  # at the median, some of each
    for i, r in routed.items():
        assert metrics[i]["path"] == r["path"] and metrics[i]["route_score"] == r["route_score"]
        assert (r["route_score"] > threshold) == (r["path"] == "joint")
        # each image is exactly what the path that cleaned it gives alone: the joint sampler's pixels (its noise is
        # seeded by the image's id, not its batch) or the network's
        same = joint[i] if r["path"] == "joint" else fast[i]
        for col in ("denoised", "noise_estimate"):  # up to float rounding in a batch of another size
            assert np.abs(_pixels(r[col]) - _pixels(same[col])).max() < 2e-3, (i, col)
        assert r["nfe"] == 1 + 8 + (3 if r["path"] == "joint" else 0)  # network, router (4 times x 2 priors), steps
    assert sup.split("/")[-2] in s_routed["models"] and sup.split("/")[-2] not in s_joint["models"]
    counts = {p: list(paths.values()).count(p) for p in ("fast", "joint")}
    assert s_routed["paths"] == counts and s_fast["paths"] == {"fast": 8} and s_joint["paths"] is None
    from pipeline.summary import format_summary

    assert (f"cleaned by the supervised network: {counts['fast']}, by the joint sampler: {counts['joint']}"
            in format_summary(s_routed))


def test_the_paths_refuse_what_they_cannot_do_in_one_line(routed_setup, tiny_priors, tmp_path, capsys):
    sup, obs = routed_setup
    base = ["clean", obs, str(tmp_path / "o"), "--set", f"priors.image={tiny_priors[0]}", "--set",
            f"priors.noise={tiny_priors[1]}", "--set", "sampler.steps=2", "--quiet"]
    cases = [
        (["--set", "sampler.path=fast"], "no supervised network ships for priors"),
        (["--set", "sampler.path=fast", "--set", f"priors.supervised={tiny_priors[0]}"], "is a prior, not a "
         "supervised network"),
        (["--set", "sampler.path=routed", "--set", f"priors.supervised={sup}", "--set", "forward.alpha=auto"],
         "sends every image whose weight is estimated to the joint sampler"),
        (["--set", "sampler.path=routed", "--set", f"priors.supervised={sup}", "--set", "priors.noise=digits",
          "--set", "priors.image=faces"], "is calibrated for"),
        (["--set", "sampler.path=routed", "--set", "priors.image=natural", "--set", "priors.noise=text", "--set",
          "forward.name=composite", "--set", "forward.alpha=0.5"], "calibrated for forward models linear in the noise"),
    ]
    for extra, message in cases:
        proc = cli(capsys, *base, *extra, check=False)
        line = proc.stderr.strip()
        assert proc.returncode == 2 and message in line and "\n" not in line and "Traceback" not in line, line
    assert not (tmp_path / "o").exists()


def test_rows_without_alpha_get_the_noise_priors_weight_on_fast_and_are_sent_on_by_routed(routed_setup, tiny_priors,
                                                                                           tmp_path):
    """Half of each shard's rows without an alpha value, and no truth: in a batch with given rows, fast estimates only
    theirs, the same at any batch size; routed sends them to the joint sampler. The fast run's report plots no
    residual (the network's rows have none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sup, obs = routed_setup
    src = tmp_path / "halfalpha"
    src.mkdir()
    for shard in sorted(p for p in __import__("pathlib").Path(obs).glob("shard-*.parquet")):
        t = pq.read_table(shard)
        alpha = [a if k % 2 else None for k, a in enumerate(t.column("alpha").to_pylist())]
        t = t.set_column(t.schema.get_field_index("alpha"), "alpha", pa.array(alpha, pa.float32()))
        pq.write_table(t.drop_columns(["clean"]), src / shard.name)
    summary, fast, metrics = _run(tiny_priors, sup, str(src), str(tmp_path / "out"), "fast")
    _, alone, _ = _run(tiny_priors, sup, str(src), str(tmp_path / "out"), "fast", batch_size=1, run_id="alone")
    _, given, _ = _run(tiny_priors, sup, obs, str(tmp_path / "given"), "fast")
    assert summary["cleaned"] == 8 and summary["alpha_estimated"] == 4 and {r["path"] for r in fast.values()} == {
        "fast"}
    from tests.test_report import _Dom

    dom = _Dom()
    dom.feed((tmp_path / "out" / "runs" / "fast" / "report.html").read_text())
    assert dom.plots[:2] == ["removed_energy-hist", "reference-free-shard"], dom.plots
    for i, r in fast.items():
        # the network's answer does not depend on the weight; its noise estimate does
        assert np.array_equal(_pixels(r["denoised"]), _pixels(given[i]["denoised"]))
        if metrics[i]["alpha"] is None:  # the network, then the noise prior: 19 weights, then 7 or 8 around the best
            assert r["nfe"] in (27, 28) and metrics[i]["alpha_error"] is None
        else:
            assert r["nfe"] == 1 and r["alpha_hat"] == pytest.approx(metrics[i]["alpha"]) == pytest.approx(0.5)
            assert np.array_equal(_pixels(r["noise_estimate"]), _pixels(given[i]["noise_estimate"]))
        # alone in its batch, each row is cleaned, and its weight picked, as in the batch of 4
        assert (alone[i]["alpha_hat"], alone[i]["nfe"]) == (r["alpha_hat"], r["nfe"])
        assert np.abs(_pixels(alone[i]["noise_estimate"]) - _pixels(r["noise_estimate"])).max() < 2e-3
    summary, routed, metrics = _run(tiny_priors, sup, str(src), str(tmp_path / "out"), "routed")
    assert summary["cleaned"] == 8
    assert all(r["path"] == "joint" for i, r in routed.items() if metrics[i]["alpha"] is None)
    assert all(r["alpha_hat"] is not None for r in routed.values())


def test_fast_cleans_text_on_photos_with_the_shipped_network_and_its_layer_recomposites_the_observation(tmp_path):
    """The composite (not linear) on the fast path: the shipped natural + text network, its noise estimate the layer
    of least coverage that explains each observation given the network's answer."""
    import pyarrow.parquet as pq

    from pipeline.config import CleanConfig
    from pipeline.data.corrupt import corrupt, write_observations
    from pipeline.data.embedded import load_embedded
    from pipeline.priors import supervised_for
    from pipeline.run.local import run_local

    if supervised_for("natural", "text") is None:
        pytest.skip("supervised-natural-text does not ship in this checkout")
    obs = str(tmp_path / "obs")
    write_observations(obs, corrupt(load_embedded("natural", "test", 32, 3, n=8), load_embedded("text", "test", 32, 4),
                                    8, alpha=0.8, seed=0, forward="composite"), shard_size=8)
    cfg = CleanConfig(priors={"image": "natural", "noise": "text"}, forward={"name": "composite", "alpha": 0.8},
                      sampler={"path": "fast"}, device="cpu")
    summary = run_local(obs, str(tmp_path / "out"), cfg, run_id="fast", progress=False)
    assert (summary["cleaned"], summary["errors"]) == (8, 0)
    run = tmp_path / "out" / "runs" / "fast"
    metrics = pq.read_table(run / "metrics").to_pylist()
    assert {m["path"] for m in metrics} == {"fast"} and {m["nfe"] for m in metrics} == {1}
    texted = [m for m in metrics if m["psnr_input"] is not None]  # an empty layer leaves the patch as it was
    assert len(texted) >= 6
    assert np.mean([m["psnr"] for m in texted]) > np.mean([m["psnr_input"] for m in texted]) + 5
    inputs = {r["id"]: r for r in pq.read_table(obs).to_pylist()}
    fwd = make_forward("composite", 1, a=0.8)
    for r in pq.read_table(run / "cleaned").to_pylist():
        x, layer = _pixels(r["denoised"]), _pixels(r["noise_estimate"])
        assert layer.shape[-1] == 4  # RGBA: the colour, then the coverage
        y = fwd.apply(torch.from_numpy(x.transpose(2, 0, 1))[None], torch.from_numpy(layer.transpose(2, 0, 1))[None])
        assert np.abs(y[0].numpy().transpose(1, 2, 0) - _pixels(inputs[r["id"]]["observation"])).max() < 0.02


@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_fast_estimates_an_unknown_blend_weight_with_the_noise_prior(tmp_path, alpha):
    """``forward.alpha: auto`` on the fast path: the shipped natural + stripes network cleans, and the weight whose
    implied noise the stripes prior finds most likely is each photo crop's own, where the network's answer leaves
    stripes to find."""
    import pyarrow.parquet as pq

    from pipeline.config import CleanConfig
    from pipeline.data.corrupt import corrupt, write_observations
    from pipeline.data.embedded import load_embedded
    from pipeline.priors import supervised_for
    from pipeline.run.local import run_local

    if supervised_for("natural", "stripes-rgb") is None:
        pytest.skip("supervised-natural-stripes does not ship in this checkout")
    obs = str(tmp_path / "obs")
    photos, stripes = load_embedded("natural", "test", 32, 3, n=8), load_embedded("stripes", "test", 32, 3)
    write_observations(obs, corrupt(photos, stripes, 8, alpha=alpha, seed=0), shard_size=8)
    cfg = CleanConfig(priors={"image": "natural", "noise": "stripes-rgb"}, forward={"alpha": "auto"},
                      sampler={"path": "fast"}, device="cpu")
    summary = run_local(obs, str(tmp_path / "out"), cfg, run_id="auto", progress=False)
    assert (summary["cleaned"], summary["alpha_estimated"]) == (8, 8)
    metrics = pq.read_table(tmp_path / "out" / "runs" / "auto" / "metrics").to_pylist()
    errors = sorted(m["alpha_error"] for m in metrics)
    assert all(m["alpha"] == pytest.approx(alpha) and m["path"] == "fast" for m in metrics)
    assert np.median(errors) <= 0.02 and errors[-1] < 0.06, errors  # guessing 0.5 errs by 0.2 on every row
    assert np.mean([m["psnr"] - m["psnr_input"] for m in metrics]) > 5
