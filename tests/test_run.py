"""The run object's pinned models: resolved once, on the driver, to a version and a fingerprint that every
worker loads and checks, whatever is published meanwhile."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
from safetensors.torch import load_file, save_file

from pipeline.config import CleanConfig
from pipeline.data.storage import local_path
from pipeline.registry import publish, resolve_latest
from pipeline.run import Run
from pipeline.run.local import clean_pending
from pipeline.run.models import fingerprint
from tests.test_clean_job import _observations


def _cfg(image: str, noise: str) -> CleanConfig:
    return CleanConfig(priors={"image": image, "noise": noise}, sampler={"steps": 2}, batch_size=4, device="cpu")


def test_a_version_published_between_planning_and_cleaning_is_not_used_the_pinned_one_is(tiny_priors, tmp_path):
    registry = str(tmp_path / "registry")
    publish(tiny_priors[0], registry, "img", version="v1")
    latest = f"{registry}/models/img/latest"
    _observations(str(tmp_path / "obs"), n=2, shard_size=2, bad_row=False)
    run = Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(latest, tiny_priors[1])).plan()
    v1 = f"file://{registry}/models/img/v1"
    assert run.pinned.image.uri == run.cfg.priors.image == v1
    assert run.pinned.image.fingerprint == fingerprint(v1)  # its config.json and weights

    publish(tiny_priors[1], registry, "img", version="v2")  # other weights, now `latest`
    assert resolve_latest(latest).endswith("/models/img/v2")
    job = clean_pending(run, progress=False)
    summary = run.finish(job["processed"], "local", 1.0, job)
    assert (summary["cleaned"], summary["errors"]) == (2, 0)
    ref = f"{v1}@sha256:{fingerprint(v1)[:16]}"
    assert summary["models"] == f'{{"image": "{ref}", "noise": "{run.pinned.noise.ref}"}}'
    model_ids = pq.read_table(local_path(f"{run.run_uri}/cleaned")).column("model_ids").to_pylist()
    assert model_ids == [f"{ref}+{run.pinned.noise.ref}"] * 2
    # the pinned version is the run's identity: naming v1 itself is the same run; `latest` now is another
    assert Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(v1, tiny_priors[1])).run_id == run.run_id
    assert Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(latest, tiny_priors[1])).run_id != run.run_id


def test_a_pinned_model_whose_files_change_fails_its_shards_naming_both_fingerprints(tiny_priors, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_priors[0], model)
    _observations(str(tmp_path / "obs"), n=2, shard_size=2, bad_row=False)
    run = Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(str(model), tiny_priors[1]), "r").plan()
    pinned = run.pinned.image.fingerprint
    weights = load_file(model / "weights.safetensors")  # retrained in place, say: other weights, same names
    save_file({k: v + 0.01 for k, v in weights.items()}, model / "weights.safetensors")
    job = clean_pending(run, progress=False)
    assert job["processed"] == 0
    errors = pq.read_table(tmp_path / "out" / "runs" / "r" / "errors").to_pylist()
    assert [e["row"] for e in errors] == [0, 1] and run.verify().ok
    reason = errors[0]["reason"]
    assert f"{model} changed after the run pinned it" in reason
    assert pinned[:16] in reason and fingerprint(str(model))[:16] in reason


def test_a_worker_builds_the_model_from_the_bytes_it_checked_not_from_a_second_read(tiny_priors, tmp_path,
                                                                                     monkeypatch):
    import torch

    from pipeline.run import models

    model = tmp_path / "model"
    shutil.copytree(tiny_priors[0], model)
    pinned = models.pin(str(model))
    weights = load_file(model / "weights.safetensors")
    read = models._files

    def a_writer_lands_right_after_the_read(uri: str) -> tuple[bytes, bytes]:
        files = read(uri)
        save_file({k: v + 1.0 for k, v in weights.items()}, model / "weights.safetensors")
        return files

    monkeypatch.setattr(models, "_files", a_writer_lands_right_after_the_read)
    net, _, _ = models.load_pinned(pinned, "cpu")  # the checked bytes: the pinned weights, not the new ones
    state = net.state_dict()
    assert set(weights) <= set(state)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    assert fingerprint(str(model)) != pinned.fingerprint  # the folder did change under it


def test_a_run_that_fails_part_way_is_one_line_saying_how_far_it_got_and_how_to_resume(tiny_priors, tmp_path,
                                                                                       capsys):
    """What the Ray executor raises when the pool stalls past its re-plans or Ray itself fails (a pool actor
    lost): the command prints one line, exit 1, and the shards done are kept."""
    import argparse

    from pipeline.jobs.commands import run_command
    from pipeline.run.shard import ShardCleaner, clean_shard

    _observations(str(tmp_path / "obs"), n=4, shard_size=2, bad_row=False)
    run = Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(*tiny_priors), "r").plan()
    clean_shard(ShardCleaner(run.cfg, run.pinned), run, run.shards[0])
    capsys.readouterr()  # the planning's note on untuned weights

    def fails(args: argparse.Namespace) -> int:
        raise run.failed("the Ray job failed (ActorDiedError: The actor died unexpectedly)")

    assert run_command(fails, argparse.Namespace(command="clean")) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"jointdiff clean: run r: the Ray job failed (ActorDiedError: The actor died unexpectedly); 1 of 2 "
                   f"shard(s) are complete in {tmp_path}/out/runs/r and kept. Run the same command again to clean "
                   "the rest.")
