"""Every output folder of a run loads in the four readers the README names (Hugging Face ``datasets``,
polars, pandas, DuckDB), on a run with errors and on one without; no output file has zero rows; a
redone shard leaves no stale file; every cleaning verb writes the run's report.

Expected row counts come from the Parquet files read with pyarrow, not from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import CleanConfig, SamplerConfig
from pipeline.data.accounting import check_run
from pipeline.report import dashboard_sql
from pipeline.run import Run
from pipeline.run.local import run_local
from pipeline.run.shard import ShardCleaner, clean_shard
from tests.test_clean_job import _edit_shard, _observations

FOLDERS = ("cleaned", "metrics", "errors")


def _cfg(priors) -> CleanConfig:
    return CleanConfig(priors={"image": priors[0], "noise": priors[1]}, sampler=SamplerConfig(steps=2), batch_size=4,
                       device="cpu")


@pytest.fixture(scope="module")
def runs(tiny_priors, tmp_path_factory):
    """Two output roots: ``with`` holds a run that rejected rows (a broken PNG, a shard without its
    observation column, so all its rows are rejected, and a file that is not Parquet); ``without`` one
    that rejected nothing."""
    root = tmp_path_factory.mktemp("outputs")
    _observations(str(root / "obs-with"), n=6, shard_size=2)  # shard 0 row 1 is a truncated PNG
    nocol = pq.read_table(root / "obs-with" / "shard-00001.parquet").drop_columns(["observation"])
    pq.write_table(nocol, root / "obs-with" / "shard-00001.parquet")
    (root / "obs-with" / "shard-00003.parquet").write_bytes(b"PAR1 but not really")
    # 4 of 7 rows rejected on purpose: past the default max_rejected_fraction, so allow them all
    lenient = _cfg(tiny_priors).model_copy(update={"max_rejected_fraction": 1.0})
    with_errors = run_local(str(root / "obs-with"), str(root / "with"), lenient, progress=False)
    _observations(str(root / "obs-without"), n=4, shard_size=2, bad_row=False)
    without = run_local(str(root / "obs-without"), str(root / "without"), _cfg(tiny_priors), progress=False)
    assert (with_errors["inputs"], with_errors["cleaned"], with_errors["errors"]) == (7, 3, 4)
    assert (without["inputs"], without["cleaned"], without["errors"]) == (4, 4, 0)
    return {"root": root, "with": with_errors, "without": without}


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet")) if folder.exists() else []


def _load_everywhere(folder: Path, pattern: str, tmp_path: Path) -> dict[str, int]:
    """Rows of ``folder`` as each reader counts them (each reader decodes what it can: the image
    columns as PIL images in ``datasets``)."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    hive = "metrics" in folder.parts
    ds = datasets.Dataset.from_parquet(str(folder / pattern), cache_dir=str(tmp_path / "hf"))
    if "denoised" in ds.column_names:
        image = ds[0]["denoised"]  # decoded by `datasets` from the {bytes, path} struct
        assert image.size == (16, 16), image
    counts = {"datasets": ds.num_rows,
              "polars": pl.read_parquet(str(folder / pattern), hive_partitioning=hive).height,
              "pandas": len(pd.read_parquet(folder)),
              "duckdb": duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder / pattern}', "
                                   f"hive_partitioning = {str(hive).lower()})").fetchall()[0][0]}
    if hive:  # the partition column comes back from the path
        assert pd.read_parquet(folder)["run_id"].astype(str).unique().tolist() == [folder.parent.name]
    return counts


@pytest.mark.parametrize("which", ["with", "without"])
def test_every_output_folder_loads_in_datasets_polars_pandas_and_duckdb(runs, which, tmp_path):
    out = runs["root"] / which
    run = out / "runs" / runs[which]["run_id"]
    folders = {f: (run / f, "*/*.parquet" if f == "metrics" else "*.parquet") for f in FOLDERS}
    folders["summary"] = (out / "summary", "*.parquet")
    loaded = {}
    for name, (folder, pattern) in folders.items():
        files = _files(folder)
        rows = sum(pq.read_metadata(p).num_rows for p in files)
        if not files:
            loaded[name] = rows
            continue
        counts = _load_everywhere(folder, pattern, tmp_path)
        assert counts == dict.fromkeys(counts, rows), (name, counts)
        loaded[name] = rows
    assert [p for p in out.rglob("*.parquet") if pq.read_metadata(p).num_rows == 0] == []  # no zero-row file
    summary = runs[which]
    assert loaded == {"cleaned": summary["cleaned"], "metrics": summary["cleaned"], "errors": summary["errors"],
                      "summary": 1}
    if which == "with":  # the shard whose every row was rejected has no cleaned or metrics file
        assert sorted(p.name for p in _files(run / "cleaned")) == ["shard-00000.parquet", "shard-00002.parquet"]
        assert len(_files(run / "errors")) == 3
    else:
        assert not (run / "errors").exists()
    assert check_run(summary["dataset"], str(run)).ok


def test_the_dashboard_queries_run_on_outputs_without_any_error_file(runs):
    import duckdb

    out = runs["root"] / "without"
    assert list(out.glob("runs/*/errors/*.parquet")) == []
    rates = duckdb.sql(dashboard_sql("error_rate_per_dataset", str(out))).fetchall()
    assert rates == [(runs["without"]["dataset"], 4, 0, 0.0)]
    trend = duckdb.sql(dashboard_sql("psnr_trend_per_day", str(out))).fetchall()
    assert sum(t[1] for t in trend) == 4


def test_a_redone_shard_leaves_no_stale_file(tiny_priors, tmp_path):
    obs, out = tmp_path / "obs", tmp_path / "out"
    _observations(str(obs), n=4, shard_size=2)  # shard 0 row 1 is a truncated PNG
    first = run_local(str(obs), str(out), _cfg(tiny_priors), run_id="r", progress=False)
    run = out / "runs" / "r"
    assert first["errors"] == 1 and (run / "errors" / "shard-00000.parquet").exists()

    good = pq.read_table(obs / "shard-00001.parquet").to_pylist()[0]["observation"]

    def repair(rows):
        rows[1]["observation"] = good
    _edit_shard(str(obs), "shard-00000.parquet", repair)  # the input shard changed: the run redoes it
    again = run_local(str(obs), str(out), _cfg(tiny_priors), run_id="r", progress=False)
    assert (again["cleaned"], again["errors"], again["skipped_shards"]) == (4, 0, 1)
    assert _files(run / "errors") == []  # the earlier errors file of the shard is gone

    # a shard given up on after an attempt wrote its files: its cleaned and metrics files go too
    cfg = _cfg(tiny_priors)
    plan = Run.open(str(obs), str(out), cfg, run_id="s").plan()
    shard = plan.shards[1]
    clean_shard(ShardCleaner(plan.cfg, plan.pinned), plan, shard)
    s = out / "runs" / "s"
    assert (s / "cleaned" / shard.name).exists() and (s / "metrics" / "run_id=s" / shard.name).exists()
    plan.give_up(shard, "gave up")
    assert _files(s / "cleaned") == [] and _files(s / "metrics") == []
    assert [e["row"] for e in pq.read_table(s / "errors" / shard.name).to_pylist()] == [0, 1]
    assert check_run(str(obs), str(s)).missing == [("shard-00000.parquet", 0), ("shard-00000.parquet", 1)]


def test_clean_writes_the_report_and_prints_its_path(tiny_priors, tmp_path, capsys, monkeypatch):
    """The local executor here; the Ray executor's report: tests/test_clean_job.py (one verb, both executors)."""
    from pipeline.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _observations(str(tmp_path / "obs"), n=2, shard_size=2, bad_row=False)
    args = [str(tmp_path / "obs"), str(tmp_path / "out"), "--set", f"priors.image={tiny_priors[0]}",
            "--set", f"priors.noise={tiny_priors[1]}", "--set", "sampler.steps=2", "--set", "device=cpu", "--quiet"]
    assert main(["clean", *args]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["report"].startswith("file:///") and summary["executor"] == "local"  # local paths: file:// URIs
    report = Path(summary["report"].removeprefix("file://"))
    assert report == tmp_path / "out" / "runs" / summary["run_id"] / "report.html" and report.exists()
    assert f"  report: {report}" in err.splitlines()
    assert "errors/" not in err  # no rejected row: no errors folder to point at
    assert "<table class=\"grid\"" in report.read_text()


def test_a_run_whose_input_has_no_row_still_has_a_report(tiny_priors, tmp_path):
    _observations(str(tmp_path / "obs"), n=2, shard_size=2, bad_row=False)
    table = pq.read_table(tmp_path / "obs" / "shard-00000.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "obs" / "shard-00000.parquet")
    summary = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(tiny_priors), progress=False)
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (0, 0, 0)
    assert Path(summary["report"].removeprefix("file://")).exists()
    assert list((tmp_path / "out").rglob("*.parquet")) == list((tmp_path / "out" / "summary").glob("*.parquet"))
