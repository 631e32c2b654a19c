"""``jointdiff learn-prior`` (:mod:`pipeline.jobs.learn`, :mod:`flows.learn_prior`): an image prior learned from
corrupted data by EM, as the Prefect flow on Ray Data (cleaning) and Ray Train (fine-tuning); the Gaussian round 0
as a model folder; resuming after a stop between rounds; the stopping rule; one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded
from pipeline.data.shards import write_dataset
from pipeline.diffusion.checkpoint import CheckpointError, load_model, save_model, write_tensors
from pipeline.diffusion.sde import VPSDE
from pipeline.jobs.learn import decide
from pipeline.posterior.priors import GaussianPrior
from tests.conftest import cli

SDE = VPSDE()


def test_a_gaussian_prior_round_trips_as_a_model_folder_and_damage_is_refused(tmp_path):
    x = torch.rand(20, 1, 16, 16)
    g = GaussianPrior.fit(x, SDE, per_pixel=True)
    save_model(str(tmp_path / "g"), g, SDE, {"name": "g"})
    loaded, sde, meta = load_model(str(tmp_path / "g"))
    assert isinstance(loaded, GaussianPrior) and meta["name"] == "g" and sde == SDE
    assert torch.equal(loaded.mean, g.mean) and torch.equal(loaded.var, g.var)
    assert (loaded.config.channels, loaded.config.image_size) == (1, 16)
    xt, t = torch.randn(3, 1, 16, 16), torch.full((3,), 0.4)
    assert torch.allclose(loaded(xt, t), g(xt, t))
    # a variance that is not positive, or weights of another shape, are refused naming the file
    write_tensors(str(tmp_path / "g" / "weights.safetensors"), {"mean": g.mean, "var": -g.var})
    with pytest.raises(CheckpointError, match="var has non-positive"):
        load_model(str(tmp_path / "g"))
    write_tensors(str(tmp_path / "g" / "weights.safetensors"), {"mean": g.mean[:, :8], "var": g.var[:, :8]})
    with pytest.raises(CheckpointError, match=r"mean has shape \(1, 8, 16\), the config says \(1, 16, 16\)"):
        load_model(str(tmp_path / "g"))
    with pytest.raises(ValueError, match="no image shape"):
        save_model(str(tmp_path / "scalar"), GaussianPrior(0.0, 1.0, SDE), SDE)


def test_the_stopping_rule_keeps_the_best_round_and_stops_when_the_fit_stops_improving():
    rec = [{"noise_fit": f} for f in (0.15, 0.06, 0.041)]
    assert decide(rec, 0.01) == (2, False)  # 0.041 improves on 0.06 by 32%
    assert decide([*rec, {"noise_fit": 0.0408}], 0.01) == (3, True)  # 0.5% better than 0.041: not enough
    assert decide([*rec, {"noise_fit": 0.05}], 0.01) == (2, True)  # worse: the best stays round 2
    assert decide([*rec, {"noise_fit": 0.05}], None) == (2, False)  # --no-early-stop
    assert decide(rec[:1], 0.01) == (0, False)


def _observations(root: Path, n: int, seed: int, split: str = "train") -> str:
    obs = corrupt(load_embedded("faces", split, 16, 1), load_embedded("digits", split, 16, 1), n, alpha=0.5,
                  seed=seed)
    uri = str(root / f"obs-{split}")
    write_observations(uri, obs, shard_size=4)
    return uri


TINY = ["forward.alpha=0.5", "sampler.steps=4", "batch_size=4"]
TINY_TRAIN = ["train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every=2",
              "train.threads=1"]


def test_the_flow_learns_round_by_round_publishes_each_prior_and_resumes_after_a_stop_between_rounds(
        prefect_harness, ray_local, tiny_priors, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.learn_prior import learn_prior
    from pipeline.registry import resolve_latest

    obs = _observations(tmp_path, 8, 0)
    val = _observations(tmp_path, 4, 1, "test")
    noise = tiny_priors[1]
    out = tmp_path / "out"
    args = dict(input_uri=obs, output=str(out), noise_prior=noise, overrides=TINY, prior_overrides=TINY_TRAIN,
                name="faces-em", validation=val, run_id="em", tolerance=None, progress=False)

    # a run of one round stops between rounds (as a stopped job would)
    first = learn_prior(rounds=1, **args)
    root = out / "learn" / "em"
    assert [r["round"] for r in first["rounds"]] == [0, 1]
    r0, r1 = first["rounds"]
    # round 0: the per-pixel Gaussian of the observations, a model folder the cleaning job loaded
    gauss, _, _ = load_model(str(root / "round-0" / "model"))
    y = torch.from_numpy(corrupt(load_embedded("faces", "train", 16, 1), load_embedded("digits", "train", 16, 1), 8,
                                 alpha=0.5, seed=0).observation)
    assert isinstance(gauss, GaussianPrior) and torch.allclose(gauss.mean, (y * 2 - 1).mean(0), atol=1e-4)
    assert not r0["network"] and r1["network"]
    # each round cleaned every training observation (Ray Data) and the validation set, with one sample each
    for r in (r0, r1):
        assert r["cleaned_rows"] == 8 and r["errors"] == 0 and r["noise_fit"] > 0
        assert r["validation_psnr"] is not None and 0 < r["validation_ssim"] <= 1
        summary = pq.read_table(root / f"round-{r['round']}" / "clean" / "summary").to_pylist()
        assert len(summary) == 1 and json.loads(summary[0]["sampler"])["n_samples"] == 1
        assert Path(r["sample_sheet"].removeprefix("file://")).is_file()
    # round 1: trained by Ray Train on round 0's samples, from scratch (round 0 is no network), published
    card1 = load_model(r1["published"])[2]
    assert card1["dataset"] == r0["samples"] and card1["steps"] == 2 and card1["workers"] == 1
    assert card1["train_config"]["init"] is None
    assert Path(r1["loss_curve"].removeprefix("file://")).is_file()
    for k in (0, 1):
        assert (out / "models" / "faces-em" / f"em-round-{k}" / "weights.safetensors").is_file()
    assert first["latest"] == (out / "models" / "faces-em" / "latest").as_uri()
    assert resolve_latest(first["latest"]) == first["rounds"][first["chosen"]]["published"]
    stamp = (root / "round-1" / "round.json").stat().st_mtime_ns

    # run again with two rounds: rounds 0 and 1 are not run again; round 2 fine-tunes round 1's network
    second = learn_prior(rounds=2, **args)
    assert (root / "round-1" / "round.json").stat().st_mtime_ns == stamp
    assert second["rounds"][:2] == first["rounds"]
    r2 = second["rounds"][2]
    card2 = load_model(r2["published"])[2]
    assert card2["train_config"]["init"] == r1["model"] and card2["dataset"] == r1["samples"]
    assert json.loads((root / "learn.json").read_text())["rounds"] == second["rounds"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["learn-prior-em"])))
    # one artifact per flow run: the second's table has rounds 0 to 2, each with its samples
    assert len(arts) == 2 and any("\n| 2" in a.data and a.data.count("data:image/png;base64,") == 5 for a in arts)


@pytest.mark.parametrize("argv, message", [
    (["missing", "out", "--noise-prior", "digits"], "INPUT missing: .*no such dataset folder; make one with"),
    (["OBS", "out", "--noise-prior", "nope"], "--noise-prior nope: "),
    (["OBS", "out", "--noise-prior", "digits", "--set", "forward.name=composite"],
     "forward.name=composite: its noise is an RGBA layer, which learn-prior.s noise fit does not read"),
    (["OBS", "out", "--noise-prior", "digits", "--rounds", "0"], "--rounds 0: at least 1"),
    (["OBS", "out", "--noise-prior", "digits", "--prior-set", "unet.image_size=64"],
     "the image prior .its network. and --noise-prior digits: the image prior is 1x64x64 but the noise prior is "
     "1x32x32"),
    (["OBS", "out", "--noise-prior", "digits", "--workers", "0"], "--workers 0: at least 1"),
    (["OBS", "out", "--noise-prior", "digits", "--validation", "NOTRUTH"],
     "--validation .*NOTRUTH: no column 'clean' .*\\(the truth that PSNR is measured against\\)"),
    (["OBS", "out", "--noise-prior", "digits", "--start", "faces", "--prior-set", "unet.base_channels=8"],
     "--start faces: the image prior's network differs from it \\(unet.base_channels 8, --start's 16\\)"),
])
def test_a_wrong_argument_is_one_line_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    obs = corrupt(load_embedded("faces", "train", 32, 1), load_embedded("digits", "train", 32, 1), 4, alpha=0.5)
    write_observations(str(tmp_path / "OBS"), obs, shard_size=4)
    write_dataset(str(tmp_path / "NOTRUTH"), obs.ids, {"observation": obs.observation}, bits={"observation": 16})
    res = cli(capsys, "learn-prior", *argv, check=False)
    assert res.returncode == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_ray_trains_own_ctrl_c_exit_becomes_an_interruption_and_its_handler_is_removed():
    """Ray Train's ``fit`` installs a SIGINT handler that aborts the run by ``sys.exit`` and stays installed; the
    wrapper turns the exit into an interruption that says how to resume and puts the handler before it back."""
    import signal
    import sys

    from pipeline.jobs.train_prior import _fit_interruptibly

    before = signal.getsignal(signal.SIGINT)

    class Trainer:  # what TorchTrainer.fit does on Ctrl-C (ray/train/v2/api/data_parallel_trainer.py)
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
            sys.exit(0)

    with pytest.raises(KeyboardInterrupt, match="run the same command again to resume"):
        _fit_interruptibly(Trainer())
    assert signal.getsignal(signal.SIGINT) is before


def test_submit_makes_learn_priors_local_paths_absolute_and_keeps_a_shipped_prior_a_name(tmp_path, monkeypatch):
    from pipeline.jobs.submit import job_command

    monkeypatch.chdir(tmp_path)
    argv = job_command("learn-prior", ["obs", "out", "--noise-prior", "digits", "--start=reg/models/x/latest",
                                       "--validation", "val", "--quiet"], tmp_path)
    root = tmp_path.as_uri()
    assert argv == ["python3", "-m", "pipeline.jobs.entry", "learn-prior", f"{root}/obs", f"{root}/out",
                    "--noise-prior", "digits", f"--start={root}/reg/models/x/latest", "--validation", f"{root}/val",
                    "--quiet"]
