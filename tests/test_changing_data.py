"""Data that changes under a run: shards rewritten in place, landing during a run, removed after it (issue 17)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import CleanConfig, SamplerConfig
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded
from pipeline.data.storage import open_fs
from pipeline.run import Run
from pipeline.run.local import run_local
from pipeline.run.shard import ShardCleaner, clean_shard
from pipeline.summary import format_summary


def _cfg(priors) -> CleanConfig:
    return CleanConfig(priors={"image": priors[0], "noise": priors[1]}, sampler=SamplerConfig(steps=2), batch_size=4,
                       device="cpu")


def _obs(uri: str, n: int = 4, shard_size: int = 2) -> None:
    write_observations(uri, corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), n,
                                    seed=0), shard_size=shard_size)


def _ids(uri: str) -> list[str]:
    fs, path = open_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=["id"]).column("id").to_pylist()


def _padded(table: pa.Table, pad: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), b"pad": b"x" * pad}), sink,
                   compression="zstd")
    return sink.getvalue().to_pybytes()


def _rewrite(uri: str, rename=lambda i: i, same_size: bool = True) -> None:
    """Rewrite the shard at ``uri`` in place with its ids renamed, as a producer that regenerates a shard would:
    padded (a schema metadata key) to the very same byte size, or, with ``same_size=False``, with room to pad."""
    fs, path = open_fs(uri)
    with fs.open(path, "rb") as f:
        old = f.read()
    table = pq.read_table(pa.BufferReader(old))
    table = table.set_column(table.schema.get_field_index("id"), "id",
                             pa.array([rename(i) for i in table.column("id").to_pylist()], pa.string()))
    data = _padded(table, 512)
    if same_size:
        data = next((d for d in (_padded(table, k) for k in range(1024)) if len(d) == len(old)), b"")
        assert data, "could not rewrite the shard to the same size"
    with fs.open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_rewritten_in_place_with_the_same_size_is_cleaned_again(tiny_priors, tmp_path, where, request):
    root = request.getfixturevalue("s3")[0] if where == "s3" else str(tmp_path)
    obs, out = f"{root}/obs", f"{root}/out"
    _obs(obs)
    _rewrite(f"{obs}/shard-00001.parquet", same_size=False)  # room to pad its rewrite to the same size
    cfg = _cfg(tiny_priors)
    first = run_local(obs, out, cfg, run_id="r", progress=False)
    assert first["cleaned"] == 4
    shard = f"{obs}/shard-00001.parquet"
    fs, path = open_fs(shard)
    size = fs.size(path)
    _rewrite(shard, lambda i: "new-" + i[4:])
    assert fs.size(path) == size
    again = run_local(obs, out, cfg, run_id="r", progress=False)
    assert again["skipped_shards"] == 1 and again["processed"] == 2, "the rewritten shard was skipped"
    cleaned = set(pq.read_table(open_fs(f"{out}/runs/r/cleaned")[0].open(
        open_fs(f"{out}/runs/r/cleaned/shard-00001.parquet")[1], "rb")).column("id").to_pylist())
    assert cleaned == set(_ids(shard)) and all(i.startswith("new-") for i in cleaned)
    assert again["inputs"] == again["cleaned"] == 4
    # and a third run, with nothing changed, skips both
    assert run_local(obs, out, cfg, run_id="r", progress=False)["skipped_shards"] == 2


def test_a_shard_that_lands_during_a_run_is_left_for_the_next_run(tiny_priors, tmp_path):
    obs, out = str(tmp_path / "obs"), str(tmp_path / "out")
    _obs(obs)
    cfg = _cfg(tiny_priors)
    run = Run.open(obs, out, cfg, run_id="r").plan()
    # a producer adds a shard while the run cleans the two it planned
    shutil.copy(tmp_path / "obs" / "shard-00001.parquet", tmp_path / "obs" / "shard-00002.parquet")
    _rewrite(f"file://{tmp_path}/obs/shard-00002.parquet", lambda i: "late-" + i[5:], same_size=False)
    cleaner = ShardCleaner(run.cfg, run.pinned)
    for s in run.pending:
        clean_shard(cleaner, run, s)
    summary = run.finish(4, "local", 1.0)  # accounting against the plan the run started with
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (4, 4, 0)
    # the next run cleans the new shard only
    nxt = run_local(obs, out, cfg, run_id="r", progress=False)
    assert (nxt["skipped_shards"], nxt["processed"], nxt["inputs"], nxt["cleaned"]) == (2, 2, 6, 6)


def test_outputs_of_a_shard_removed_after_cleaning_are_kept_and_reported_orphaned(tiny_priors, tmp_path):
    obs, out = str(tmp_path / "obs"), str(tmp_path / "out")
    _obs(obs, n=6)
    cfg = _cfg(tiny_priors)
    run_local(obs, out, cfg, run_id="r", progress=False)
    (tmp_path / "obs" / "shard-00000.parquet").unlink()  # retention
    summary = run_local(obs, out, cfg, run_id="r", progress=False)
    assert summary["orphaned_shards"] == ["shard-00000.parquet"]
    assert (summary["inputs"], summary["cleaned"], summary["errors"], summary["skipped_shards"]) == (4, 4, 0, 2)
    run = tmp_path / "out" / "runs" / "r"
    assert (run / "cleaned" / "shard-00000.parquet").exists() and (run / "metrics" / "run_id=r" /
                                                                   "shard-00000.parquet").exists()
    assert "1 shard(s) cleaned earlier are no longer in the input (shard-00000.parquet): their outputs are kept, " \
           "orphaned, and not counted" in format_summary(summary)


def test_a_shard_removed_while_a_run_is_under_way_is_orphaned_not_an_error(tiny_priors, tmp_path):
    obs, out = str(tmp_path / "obs"), str(tmp_path / "out")
    _obs(obs, n=6)
    cfg = _cfg(tiny_priors)
    run = Run.open(obs, out, cfg, run_id="r").plan()
    cleaner = ShardCleaner(run.cfg, run.pinned)
    for s in run.pending:
        clean_shard(cleaner, run, s)
    (tmp_path / "obs" / "shard-00000.parquet").unlink()  # retention, after the shard was cleaned
    summary = run.finish(6, "local", 1.0)
    assert summary["orphaned_shards"] == ["shard-00000.parquet"]
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (4, 4, 0)
