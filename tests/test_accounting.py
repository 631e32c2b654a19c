"""The shard plan (resume by completion markers) and the accounting check of a cleaning run."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import CleanConfig, SamplerConfig
from pipeline.data.accounting import AccountingError, check_run, plan
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded
from pipeline.run.local import run_local
from pipeline.training import train_prior
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    models = []
    for name in ("img", "noise"):
        train_prior(tiny_config(str(root / name), steps=2, checkpoint_every=2), progress=False)
        models.append(str(root / name / "model"))
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 9, seed=0)
    write_observations(str(root / "obs"), obs, shard_size=3)
    good = pq.read_table(root / "obs" / "shard-00000.parquet")
    # a shard without its observation column, an empty shard, and a file that is not Parquet at all
    nocol = good.slice(0, 2).drop_columns(["observation"]).set_column(0, "id", pa.array(["m0", "m1"]))
    pq.write_table(nocol, root / "obs" / "shard-00003.parquet")
    pq.write_table(good.slice(0, 0), root / "obs" / "shard-00004.parquet")
    (root / "obs" / "shard-00005.parquet").write_bytes(b"PAR1 but not really")
    cfg = CleanConfig(priors={"image": models[0], "noise": models[1]}, sampler=SamplerConfig(steps=2), batch_size=4)
    return root, cfg


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
    """One run ``r`` of the setup's dataset, done once for the module (the unreadable shard alone costs seconds
    of read retries per run): ``(output folder, summary)``. Tests copy it (:func:`_copy_of`) before changing it."""
    root, cfg = setup
    out = tmp_path_factory.mktemp("first") / "out"
    return out, run_local(str(root / "obs"), str(out), cfg, run_id="r", progress=False)


def _copy_of(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    return out


def _mtimes(run):
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in run.rglob("*.parquet")}


def test_every_row_is_accounted_for_and_a_rerun_redoes_only_unmarked_shards(setup, first_run, tmp_path):
    root, cfg = setup
    first, out = first_run[1], _copy_of(first_run, tmp_path)
    # 9 good rows + 2 rows of the shard without 'observation' + 1 for the unreadable shard
    assert (first["inputs"], first["cleaned"], first["errors"], first["skipped_shards"]) == (12, 9, 3, 0)
    run = out / "runs" / "r"
    errors = pq.read_table(run / "errors").to_pylist()
    reasons = {(e["shard"], e["row"]): e["reason"] for e in errors}
    assert "lacks column(s) ['observation']" in reasons[("shard-00003.parquet", 0)]
    assert "cannot be read" in reasons[("shard-00005.parquet", -1)]
    assert check_run(str(root / "obs"), str(run)).ok
    ids = pq.read_table(run / "cleaned").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9

    before = _mtimes(run)
    again = run_local(str(root / "obs"), str(out), cfg, run_id="r", progress=False)
    assert again["skipped_shards"] == 6 and again["cleaned"] == 9 and _mtimes(run) == before
    (run / "_done" / "shard-00001.json").unlink()
    assert [s.name for s in plan(str(root / "obs"), str(run)) if not s.done] == ["shard-00001.parquet"]
    redo = run_local(str(root / "obs"), str(out), cfg, run_id="r", progress=False)
    after = _mtimes(run)
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == ["cleaned/shard-00001.parquet", "metrics/run_id=r/shard-00001.parquet"]  # no error: no file
    assert redo["skipped_shards"] == 5 and (redo["cleaned"], redo["errors"]) == (9, 3)
    # the redone shard's results are the same (per-image seeds), so nothing downstream moves
    assert pq.read_table(run / "cleaned").column("id").to_pylist() == ids


def test_accounting_names_missing_and_duplicated_rows_and_fails_the_run(setup, first_run, tmp_path):
    root, cfg = setup
    out = _copy_of(first_run, tmp_path)
    run = out / "runs" / "r"
    m0 = run / "metrics" / "run_id=r" / "shard-00000.parquet"
    pq.write_table(pq.read_table(m0).slice(1), m0)  # row 0 of shard 0 is lost
    e1 = run / "errors" / "shard-00003.parquet"
    t = pq.read_table(e1)
    pq.write_table(pa.concat_tables([t, t.slice(1, 1)]), e1)  # row 1 of shard 3 counted twice
    acc = check_run(str(root / "obs"), str(run))
    assert not acc.ok
    assert acc.missing == [("shard-00000.parquet", 0)]
    assert acc.duplicated == [("shard-00003.parquet", 1, 2)]
    text = acc.describe()
    assert "1 missing: shard-00000.parquet row 0" in text and "1 duplicated: shard-00003.parquet row 1 x2" in text
    with pytest.raises(AccountingError, match="shard-00000.parquet row 0"):
        run_local(str(root / "obs"), str(out), cfg, run_id="r", progress=False)


def test_accounting_fails_when_an_id_is_cleaned_twice(setup, first_run, tmp_path):
    root, _ = setup
    out = _copy_of(first_run, tmp_path)
    run = out / "runs" / "r"
    m0, m1 = (run / "metrics" / "run_id=r" / f"shard-0000{k}.parquet" for k in (0, 1))
    t1 = pq.read_table(m1)
    copied = pq.read_table(m0).column("id")[0].as_py()
    pq.write_table(t1.set_column(t1.schema.get_field_index("id"), "id",
                                 pa.array([copied] + t1.column("id").to_pylist()[1:])), m1)
    acc = check_run(str(root / "obs"), str(run))  # every row once, but one id twice among the cleaned
    assert not acc.ok and not acc.missing and not acc.duplicated and acc.duplicate_ids == [(copied, 2)]
    assert f"1 id(s) cleaned more than once: {copied!r} x2" in acc.describe()


def test_a_resumed_run_rejects_the_same_duplicate_ids_as_a_fresh_one(setup, tmp_path):
    """The first copy of 'dup' fails to decode; its later copy in another shard is still a duplicate,
    also when only that later shard is redone (ids seen in done shards' errors count too)."""
    root, cfg = setup
    cfg = cfg.model_copy(update={"max_rejected_fraction": 1.0})  # 2 of its 3 rows are rejected on purpose
    good = pq.read_table(root / "obs" / "shard-00000.parquet")
    rows = good.slice(0, 2).to_pylist()
    rows[1]["id"] = "dup"
    rows[1]["observation"] = {"bytes": rows[1]["observation"]["bytes"][:30], "path": "dup.png"}  # truncated
    later = dict(good.slice(2, 1).to_pylist()[0], id="dup")
    (tmp_path / "obs").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=good.schema), tmp_path / "obs" / "shard-00000.parquet")
    pq.write_table(pa.Table.from_pylist([later], schema=good.schema), tmp_path / "obs" / "shard-00001.parquet")
    out = tmp_path / "out"
    run_local(str(tmp_path / "obs"), str(out), cfg, run_id="r", progress=False)
    run = out / "runs" / "r"

    def dup_errors():
        return sorted((e["shard"], e["stage"]) for e in pq.read_table(run / "errors").to_pylist() if e["id"] == "dup")

    fresh = dup_errors()
    assert fresh == [("shard-00000.parquet", "decode"), ("shard-00001.parquet", "validate")]
    (run / "_done" / "shard-00001.json").unlink()
    summary = run_local(str(tmp_path / "obs"), str(out), cfg, run_id="r", progress=False)
    assert dup_errors() == fresh and summary["cleaned"] == 1
