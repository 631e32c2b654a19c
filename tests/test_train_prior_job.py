"""Ray Train data-parallel training (pipeline.jobs.train_prior) — work in progress for issue 6."""

from __future__ import annotations

import json

import torch

from pipeline.diffusion.checkpoint import load_model
from pipeline.jobs.train_prior import train_distributed
from pipeline.training import to_network, train_prior
from tests.conftest import tiny_config


def test_two_workers_on_s3_stopped_then_resumed_with_more_steps_publish_to_the_registry_and_the_sampler_loads_latest(
        s3, ray_local):
    # One run, two Ray Train starts (each costs far more than the steps), checkpoints on S3, each worker
    # reading its own shards: stopped at step 3 of 6, then run again with more steps, to 30.
    from pipeline.data.embedded import load_embedded
    from pipeline.data.shards import write_image_shards
    from pipeline.data.storage import open_fs
    from pipeline.diffusion.sampling import sample
    from pipeline.priors import resolve_model
    from pipeline.registry import card

    bucket, _ = s3
    digits = load_embedded("digits", "train", 16, n=400)
    write_image_shards(f"{bucket}/digits", digits.ids, digits.images, shard_size=100)  # 4 shards: 2 per worker
    cfg = tiny_config(f"{bucket}/train/tiny", steps=6, checkpoint_every=2, threads=1, lr=2e-3)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": f"{bucket}/digits"})})
    fs, _ = open_fs(bucket)
    state = f"{bucket.removeprefix('s3://')}/train/tiny/state"

    def losses(step: int) -> list[float]:
        return json.loads(fs.cat_file(f"{state}/step-{step:07d}/state.json"))["losses"]

    assert train_distributed(cfg, num_workers=2, stop_after=3) is None  # stopped at step 3; state at step 2
    assert json.loads(fs.cat_file(f"{state}/latest.json"))["step"] == 2
    assert not fs.exists(f"{bucket.removeprefix('s3://')}/train/tiny/model")
    first = losses(2)

    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 30})})
    meta = train_distributed(more, num_workers=2, registry=f"{bucket}/registry")
    assert fs.exists(f"{state}/step-0000030/model.safetensors")
    thirty = losses(30)
    assert len(thirty) == 30 and thirty[:2] == first  # resumed from step 2: no step redone from zero
    # rank 0's losses, each the DSM loss of its shards: they go down
    assert sum(thirty[-5:]) / 5 < sum(thirty[:5]) / 5
    assert meta["workers"] == 2 and meta["steps"] == 30
    assert meta["n_train_images"] == 400  # both workers' shards counted
    assert meta["published"].startswith(f"{bucket}/registry/models/tiny/v")
    latest = resolve_model(f"{bucket}/registry/models/tiny/latest")
    assert latest == meta["published"]
    c = card(latest)
    assert c["steps"] == 30 and c["workers"] == 2 and c["dataset"] == f"{bucket}/digits"
    assert len(c["dataset_hash"]) == 16 and c["git_commit"]
    model, sde, _ = load_model(latest)
    x = sample(model, sde, 2, 3, seed=0)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_a_dataset_with_fewer_shards_than_workers_is_split_by_rows_each_row_to_one_worker():
    """Without a shard per worker, every worker loads all the images and keeps rows ``rank::world``: the
    parts are disjoint and cover the data (the Ray runs above split by shard; the flow's runs have one worker)."""
    from pipeline.jobs.train_prior import _worker_data

    cfg = tiny_config("unused")
    parts = [_worker_data(cfg, rank, 3) for rank in range(3)]
    everything = parts[0][0]
    assert all(p[3] == len(everything) and p[4] == parts[0][4] for p in parts)  # the whole set counted and hashed
    assert sum(p[1].shape[0] for p in parts) == len(everything)
    for rank, p in enumerate(parts):
        assert torch.equal(p[1], to_network(torch.from_numpy(everything.images))[rank::3])


def test_the_train_priors_flow_publishes_both_priors_with_artifacts_and_one_worker_gives_single_process_weights(
        prefect_harness, ray_local, tmp_path):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train_priors import train_priors
    from pipeline.registry import resolve_latest

    paths = []
    for name in ("img", "noise"):
        cfg = tiny_config(str(tmp_path / name), steps=4, checkpoint_every=2, threads=1)
        cfg = cfg.model_copy(update={"name": name})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        paths.append(str(path))
    cards = train_priors(paths[0], paths[1], str(tmp_path / "registry"), workers=1,
                         output_root=str(tmp_path / "train"))  # instead of each config's output
    assert set(cards) == {"img", "noise"} and all(c["steps"] == 4 for c in cards.values())
    assert all((tmp_path / "train" / n / "model" / "weights.safetensors").is_file() for n in ("img", "noise"))
    assert not (tmp_path / "img").exists()
    for name in ("img", "noise"):
        latest = resolve_latest(str(tmp_path / "registry" / "models" / name / "latest"))
        assert latest == cards[name]["published"] and load_model(latest)[2]["name"] == name
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["prior-img", "prior-noise"])))
    assert len(arts) == 2 and all("data:image/png;base64," in a.data for a in arts)

    # each prior trained on one Ray Train worker: the weights of single-process training of its config
    img = tiny_config(str(tmp_path / "single"), steps=4, checkpoint_every=2, threads=1).model_copy(
        update={"name": "img"})
    train_prior(img, progress=False)
    assert cards["img"]["workers"] == 1
    a, _, _ = load_model(str(tmp_path / "single" / "model"))
    b, _, _ = load_model(str(tmp_path / "train" / "img" / "model"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    cfg = tiny_config(str(tmp_path / "bf16"), steps=3, checkpoint_every=3, threads=1, precision="bf16")
    summary = train_prior(cfg, progress=False)
    model, _, _ = load_model(str(tmp_path / "bf16" / "model"))
    assert summary["steps"] == 3 and 0 < summary["final_loss"] < 10
    assert all(p.dtype == torch.float32 for p in model.parameters())
