"""Ray Train data-parallel training (pipeline.jobs.train_prior) — work in progress for issue 6."""

from __future__ import annotations

import json

import torch

from pipeline.diffusion.checkpoint import load_model
from pipeline.jobs.train_prior import train_distributed
from pipeline.training import train_prior
from tests.conftest import tiny_config


def test_one_worker_gives_the_weights_of_single_process_training(ray_local, tmp_path):
    single = tiny_config(str(tmp_path / "single"), steps=4, checkpoint_every=2, threads=1)
    train_prior(single, progress=False)
    dist = single.model_copy(update={"output": str(tmp_path / "dist")})
    card = train_distributed(dist, num_workers=1)
    assert card["steps"] == 4 and card["workers"] == 1
    a, _, _ = load_model(str(tmp_path / "single" / "model"))
    b, _, _ = load_model(str(tmp_path / "dist" / "model"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_two_workers_train_and_publish_a_model_that_loads(ray_local, tmp_path):
    cfg = tiny_config(str(tmp_path / "two"), steps=30, checkpoint_every=10, threads=1, lr=2e-3)
    card = train_distributed(cfg, num_workers=2)
    assert card["workers"] == 2 and card["steps"] == 30
    model, _, meta = load_model(str(tmp_path / "two" / "model"))
    state = json.loads((tmp_path / "two" / "state" / "step-0000030" / "state.json").read_text())
    losses = state["losses"]  # rank 0's losses, each the DSM loss of its half of the data
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
