"""Learning the image prior by EM (pipeline/posterior/em.py) on a case whose fixed point is known in closed form:
Gaussian priors, a blend with read-out noise. The iteration with posterior samples reaches the maximum-likelihood
Gaussian; a refit on posterior means (the mistake the E-step's samples avoid) shrinks the variance below it."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.diffusion.sde import VPSDE
from pipeline.forward import make_forward
from pipeline.posterior.em import em_round, gaussian_mle, observation_gaussian, refit_gaussian
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import SamplerSettings
from tests.conftest import exact_gaussian  # noqa: F401  (registers the exact posterior SDE's rule)

SDE = VPSDE()
MU_X = torch.tensor([[0.4, -0.3], [0.1, 0.6]]).reshape(1, 2, 2)  # the clean images' law (network units)
V_X = 0.15
MU_N = torch.tensor([[-0.5, 0.2], [0.3, -0.1]]).reshape(1, 2, 2)  # the noise's, known
V_N = 0.10


def test_em_with_posterior_samples_reaches_the_maximum_likelihood_gaussian_and_means_do_not():
    g = torch.Generator().manual_seed(0)
    m = 3000
    x = MU_X + V_X**0.5 * torch.randn(m, 1, 2, 2, generator=g)
    n = MU_N + V_N**0.5 * torch.randn(m, 1, 2, 2, generator=g)
    forward = make_forward("blend", m, alpha=0.5, sigma_y=0.05)
    y = forward.observe((x + 1) / 2, (n + 1) / 2, generator=g)
    mle_mean, mle_var = gaussian_mle(y, forward, MU_N, V_N)
    assert (mle_mean - MU_X).abs().max() < 0.05 and (mle_var / V_X - 1).abs().max() < 0.15  # the data's law

    prior = observation_gaussian(y, SDE)  # round 0: the observations' own per-pixel moments, far from it
    assert (prior.mean - mle_mean).abs().max() > 0.2
    noise = GaussianPrior(MU_N, V_N, SDE)
    base = SamplerSettings(rule="exact-gaussian", schedule="sde", solver="euler-maruyama", steps=200, lambda_x=1.0,
                           kappa_n=1.0, data_var_n=V_N, final_projection=False)
    for _ in range(15):  # EM's pace: each round closes about a sixth of the variance's gap here
        settings = dataclasses.replace(base, data_var_x=float(prior.var.mean()))  # the E-step's exact posterior
        prior = em_round(prior, noise, SDE, y, forward, settings, refit_gaussian(SDE), generator=g).prior
    assert (prior.mean - mle_mean).abs().max() < 0.03, (prior.mean, mle_mean)
    assert (prior.var / mle_var - 1).abs().max() < 0.12, (prior.var, mle_var)  # 3,000 samples per round

    # the same iteration refitted on posterior means (closed form) converges to the means' variance: far below
    cx, cn = 0.5, 0.5
    yt = 2 * y - cx - cn
    mean, var = observation_gaussian(y, SDE).mean, observation_gaussian(y, SDE).var
    for _ in range(15):
        var_y = cx**2 * var + cn**2 * V_N + 4 * 0.05**2
        post_mean = mean + cx * var * (yt - cx * mean - cn * MU_N) / var_y
        mean, var = post_mean.mean(0), post_mean.var(0)
    assert (var / mle_var).max() < 0.7, (var, mle_var)


def test_train_init_fine_tunes_a_models_weights_and_refuses_another_network(tiny_priors, tmp_path):
    """The M-step of a diffusion prior is fine-tuning: ``train.init`` starts a new run (and its EMA) from a model's
    weights; a model of another network is one line naming the setting; a resumed run keeps its own state."""
    import pytest

    from pipeline.diffusion.checkpoint import CheckpointConfigError, load_model
    from pipeline.diffusion.train import Trainer
    from pipeline.training import train_prior, train_settings
    from tests.conftest import tiny_config

    base = load_model(tiny_priors[0])[0].state_dict()
    cfg = tiny_config(str(tmp_path / "ft"), steps=3, checkpoint_every=3, init=tiny_priors[0])
    trainer = Trainer(train_settings(cfg))
    trainer.start_from(tiny_priors[0])  # what fit() does for a run that has no state to resume
    for name, value in base.items():
        assert torch.equal(trainer.model.state_dict()[name], value) and torch.equal(
            trainer.ema.model.state_dict()[name], value), name
    scratch = Trainer(train_settings(tiny_config(str(tmp_path / "scratch"))))
    assert not all(torch.equal(scratch.model.state_dict()[k], v) for k, v in base.items())
    # a new run starts there: with a learning rate too small to move it, its exported model is the init's weights
    still = tiny_config(str(tmp_path / "ft"), steps=3, checkpoint_every=3, init=tiny_priors[0], lr=1e-12)
    train_prior(still, progress=False)
    tuned = load_model(str(tmp_path / "ft" / "model"))[0].state_dict()
    assert tuned.keys() == base.keys() and all(torch.allclose(tuned[k], base[k], atol=1e-6) for k in base)
    # resumed: its own state, even when the init model is gone
    import shutil

    gone = tmp_path / "gone"
    shutil.copytree(tiny_priors[0], gone)
    resumed = tiny_config(str(tmp_path / "ft2"), steps=3, checkpoint_every=1, init=str(gone))
    from pipeline.diffusion.train import fit
    from pipeline.training import load_train_data

    data = load_train_data(resumed)[1]
    fit(Trainer(train_settings(resumed)), data, resumed.output, stop_after=1)
    shutil.rmtree(gone)
    assert fit(Trainer(train_settings(resumed.model_copy(update={"train": resumed.train.model_copy(
        update={"steps": 3})}))), data, resumed.output)["start_step"] == 1

    other = tiny_config(str(tmp_path / "other"), init=tiny_priors[0])
    other = other.model_copy(update={"unet": other.unet.model_copy(update={"base_channels": 16})})
    with pytest.raises(CheckpointConfigError, match=r"its unet\.base_channels is 8, this run's 16; set "
                                                     r"unet\.base_channels: 8 to fine-tune it$"):
        Trainer(train_settings(other)).start_from(tiny_priors[0])
    dropout = tiny_config(str(tmp_path / "dropout"), init=tiny_priors[0])
    dropout = dropout.model_copy(update={"unet": dropout.unet.model_copy(update={"dropout": 0.1})})
    Trainer(train_settings(dropout)).start_from(tiny_priors[0])  # dropout changes no weight: allowed


def test_bench_em_runs_every_round_fine_tunes_the_last_and_resumes_where_it_stopped(tmp_path, capsys):
    """``jointdiff bench em`` on tiny settings: round 0 (the observations' Gaussian), each round, the bound; round 2
    fine-tunes round 1's prior; a second run finds every round done and recomputes nothing."""
    import json

    from tests.conftest import cli

    args = ["bench", "em", "--n", "6", "--rounds", "2", "--train-steps", "2", "--n-test", "3", "--steps", "2",
            "--threads", "1", "--state", str(tmp_path / "state"), "--json", str(tmp_path / "em.json"), "--figure",
            str(tmp_path / "em.svg")]
    first = cli(capsys, *args)
    doc = json.loads((tmp_path / "em.json").read_text())
    assert [(r["method"], r["round"], r["train_steps"]) for r in doc["rows"]] == [
        ("round 0", 0, 0), ("round 1", 1, 2), ("round 2", 2, 4), ("clean-trained", None, 4)]
    assert all(r["n_test"] == 3 and 0 < r["psnr_mean"] < 60 and r["noise_fit"] > 0 for r in doc["rows"])
    assert all(r["residual_train"] >= 0 for r in doc["rows"][1:3])
    assert f"em-round-2: training 2 steps on 6 images from {tmp_path}/state/round-1/train/model" in first.stderr
    assert "clean-trained: training 4 steps on 6 images\n" in first.stderr
    assert (tmp_path / "em.svg").read_text().startswith("<svg") and "| round 2 | 4 |" in first.stdout
    # the hidden clean images train only the bound; the rounds train on their own posterior samples
    import numpy as np

    samples = np.load(tmp_path / "state" / "round-1" / "samples.npy")
    assert samples.shape == (6, 1, 32, 32) and 0 <= samples.min() and samples.max() <= 1

    again = cli(capsys, *args)
    assert ": training" not in again.stderr and "posterior samples" not in again.stderr
    assert json.loads((tmp_path / "em.json").read_text())["rows"] == doc["rows"]
