"""What a user meets when a run cannot clean their rows (docs/reference/errors.md): the checks before any work,
the verdict on a run that rejected too many rows (exit 4), and ingested photos as training data.

The commands run by the CLI's ``main`` in this process (tests/conftest.py ``cli``): the same exit codes and
messages; tests/test_cli.py runs the command as a subprocess."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import CleanConfig, ConfigError, ForwardConfig
from pipeline.data.validate import ERRORS_SCHEMA, error_row
from pipeline.run.local import run_local
from pipeline.summary import read_summaries
from tests.conftest import cli
from tests.test_clean_job import _cfg, _edit_shard, _observations
from tests.test_cli import _tiny_yaml

PHOTOS = {"chelsea.png": "chelsea", "coffee.jpg": "coffee", "colorwheel.png": "colorwheel", "rocket.jpg": "rocket"}


def _photos(folder: Path) -> Path:
    """A few of scikit-image's sample photos as a user has them: RGB PNG and JPEG files, each at its own size (an
    eighth of the photo's: cleaned in tiles of the tiny priors in a few seconds)."""
    from skimage import data

    folder.mkdir(parents=True)
    for name, what in PHOTOS.items():
        Image.fromarray(getattr(data, what)()[::8, ::8]).save(folder / name)
    return folder


def _npy(channels: int) -> dict:
    """A stored 16x16 array of ``channels`` channels: no image (1 or 3, with or without alpha) has that many."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((16, 16, channels), dtype=np.uint8))
    return {"bytes": buf.getvalue(), "path": "x.npy"}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """The photos as `jointdiff ingest` writes them, once for the module (tests only read them)."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("ingested")
    assert main(["ingest", str(_photos(root / "photos")), str(root / "obs"), "--quiet"]) == 0
    return root / "obs"


def test_ingested_photos_without_an_alpha_clean_with_no_option_or_stop_with_the_sets_that_fix_them(
        ingested, tiny_priors, tmp_path, capsys):
    obs = ingested
    out = tmp_path / "out"
    priors = ["--set", f"priors.image={tiny_priors[0]}", "--set", f"priors.noise={tiny_priors[1]}"]
    # grey priors and RGB photos with the conversion off: stopped before the work, naming the fix
    proc = cli(capsys, "clean", str(obs), str(out), *priors, "--set", "policy.convert_channels=false", "--quiet",
               check=False)
    line = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in line and "Traceback" not in line, proc.stderr
    assert line.endswith("Add --set policy.convert_channels=true"), line
    assert not out.exists()  # stopped before the work: no run folder, no summary row
    # the Ray job (and so `jointdiff clean` and `submit clean`) stops the same way, before Ray starts
    from pipeline.jobs.clean import run_clean

    cfg = CleanConfig(priors={"image": tiny_priors[0], "noise": tiny_priors[1]}, policy={"convert_channels": False})
    with pytest.raises(ConfigError, match=r"Add --set policy\.convert_channels=true$"):
        run_clean(str(obs), str(out), cfg, progress=False)
    # no alpha column and no forward.alpha: the blend's weight is estimated per photo; every photo is cleaned at
    # its own size (only the step count is set, for time)
    proc = cli(capsys, "clean", str(obs), str(out), *priors, "--set", "sampler.steps=2", "--run-id", "r", "--quiet")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (len(PHOTOS), len(PHOTOS), 0)
    assert summary["alpha_estimated"] == len(PHOTOS) and summary["alpha_error_median"] is None
    assert f"alpha estimated for {len(PHOTOS)} image(s) (none given, or forward.alpha=auto): median " in proc.stderr
    m = pq.read_table(str(out / "runs" / "r" / "metrics")).to_pylist()
    assert all(r["alpha"] is None and r["alpha_error"] is None and 0.02 <= r["alpha_hat"] <= 0.98 for r in m), m
    # the report shows the estimates' distribution (no alpha was given)
    report = (out / "runs" / "r" / "report.html").read_text()
    assert 'data-plot="alpha-hist"' in report and 'data-plot="alpha-scatter"' not in report
    cleaned = pq.read_table(str(out / "runs" / "r" / "cleaned"), columns=["id", "alpha_hat"]).to_pylist()
    assert sorted((r["id"], r["alpha_hat"]) for r in cleaned) == sorted((r["id"], r["alpha_hat"]) for r in m)
    # exported at the photos' depth: 8-bit PNGs (ingest stores 16 bits; the source's depth is kept beside it),
    # named after the files without their extensions, each at its photo's size (grey: the priors are)
    proc = cli(capsys, "export", str(out / "runs" / "r"), str(tmp_path / "png"), "--quiet")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["bits"] == {"8": len(PHOTOS)}
    for name in PHOTOS:
        with Image.open(tmp_path / "png" / (name.rsplit(".", 1)[0] + ".png")) as im:
            assert im.mode == "L" and im.size == Image.open(obs.parent / "photos" / name).size


def test_a_dataset_with_a_few_odd_rows_goes_ahead(tiny_priors, tmp_path):
    """The check before the work stops only when none of the rows it reads would be cleaned."""
    _observations(str(tmp_path / "obs"), n=4, shard_size=4, bad_row=False)
    _edit_shard(str(tmp_path / "obs"), "shard-00000.parquet", lambda rows: rows[1].update(observation=_npy(5)))
    summary = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(tiny_priors, steps=2), progress=False)
    assert (summary["cleaned"], summary["errors"]) == (3, 1)


def _mostly_bad(uri: str) -> None:
    """8 observations, 6 of them rejected for three reasons: arrays of 5, 6 and 7 channels (3), truncated PNGs (2),
    an alpha out of the blend's range (1)."""
    _observations(uri, n=8, shard_size=8, bad_row=False)

    def spoil(rows):
        for k, c in zip((1, 2, 3), (5, 6, 7)):
            rows[k]["observation"] = _npy(c)
        for k in (4, 5):
            rows[k]["observation"] = {"bytes": rows[k]["observation"]["bytes"][:40], "path": "x.png"}
        rows[6]["alpha"] = 1.5
    _edit_shard(uri, "shard-00000.parquet", spoil)


def test_a_run_that_rejects_most_rows_is_recorded_then_exits_4_with_the_reasons_grouped(tiny_priors, tmp_path, capsys):
    _mostly_bad(str(tmp_path / "obs"))
    args = ["clean", str(tmp_path / "obs"), str(tmp_path / "out"), "--set", f"priors.image={tiny_priors[0]}",
            "--set", f"priors.noise={tiny_priors[1]}", "--set", "sampler.steps=2", "--run-id", "r", "--quiet"]
    proc = cli(capsys, *args, check=False)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run r: 2 cleaned, 6 rejected of 8 input rows" in proc.stderr  # the summary, as on success
    verdict = proc.stderr[proc.stderr.index("jointdiff clean: "):].splitlines()
    assert verdict[0] == ("jointdiff clean: run r: 6 of 8 input rows rejected (75%), 2 cleaned: more than "
                          "max_rejected_fraction=0.5. Reasons, most frequent first:")
    assert [line.split(" x ")[0].strip() for line in verdict[1:4]] == ["3", "2", "1"]
    assert verdict[1].split(" x ", 1)[1].startswith("decode: observation: cannot decode .npy: shape (16, 16, 5): "
                                                    "expected (H, W) or (H, W, C) with C at most 4")
    assert verdict[1].endswith("; 3 variants of this reason)")  # 5, 6 and 7 channels in one group
    assert verdict[2].split(" x ", 1)[1].startswith("decode: observation: cannot decode PNG")
    assert ("blend needs the noise's weight: the row's alpha column has 1.5 (blend alpha must be in (0, 1), got 1.5) "
            "and forward.alpha is not set") in verdict[3]
    assert verdict[4].startswith("every rejected row, with its id and reason: ")
    assert verdict[4].endswith("/runs/r/errors/ (the run's outputs and summary row are written)")
    # nothing is lost: the accounting ran and the summary row is written, also on stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["errors"] == 6
    assert [(r["cleaned"], r["errors"]) for r in read_summaries(str(tmp_path / "out")).to_pylist()] == [(2, 6)]
    # the verdict is about the whole run: the same run, judged with a looser limit, passes
    proc = cli(capsys, *args, "--set", "max_rejected_fraction=0.8", check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_run_that_cleans_no_row_fails_at_any_setting_and_at_most_ten_reasons_are_listed(tmp_path):
    from pipeline.data.accounting import RejectedRowsError
    from pipeline.run.judge import MAX_REASON_GROUPS, judge

    run = tmp_path / "runs" / "r"
    rows = [error_row("r", "d", "shard-00000.parquet", k, f"img{k}", "validate", f"reason {chr(97 + k % 12)} '{k}'")
            for k in range(30)]
    (run / "errors").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), run / "errors" / "shard-00000.parquet")
    summary = {"run_id": "r", "inputs": 30, "errors": 30, "cleaned": 0, "output": str(run)}
    with pytest.raises(RejectedRowsError) as caught:
        judge(summary, 1.0)
    lines = str(caught.value).splitlines()
    assert lines[0].endswith("0 cleaned: no row was cleaned. Reasons, most frequent first:")
    groups = [line for line in lines if " x validate: " in line]
    assert len(groups) == MAX_REASON_GROUPS and groups[0].split(" x ")[0].strip() == "3"
    assert lines[1 + MAX_REASON_GROUPS] == "  ... and 4 more row(s) for 2 other reason(s)"
    assert caught.value.summary is summary
    judge({**summary, "errors": 15, "cleaned": 15}, CleanConfig().max_rejected_fraction)  # half: not more than 0.5
    with pytest.raises(RejectedRowsError):
        judge({**summary, "errors": 16, "cleaned": 14}, CleanConfig().max_rejected_fraction)


def test_the_ray_job_and_the_flow_fail_such_runs_after_recording_them(prefect_harness, ray_local, tiny_priors,
                                                                        tmp_path):
    from flows.clean_dataset import clean_dataset
    from pipeline.data.accounting import RejectedRowsError
    from pipeline.jobs.clean import run_clean

    _mostly_bad(str(tmp_path / "obs"))
    cfg = _cfg(tiny_priors, steps=2, actors=1, gpus_per_actor=0, threads_per_actor=1)
    with pytest.raises(RejectedRowsError, match="6 of 8 input rows rejected") as caught:
        run_clean(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False)
    assert caught.value.summary["executor"] == "ray" and caught.value.summary["cleaned"] == 2
    config = tmp_path / "clean.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    state = clean_dataset(str(tmp_path / "obs"), str(tmp_path / "out"), config=str(config), run_id="r",
                          progress=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(RejectedRowsError):
        state.result()
    assert len(read_summaries(str(tmp_path / "out")).to_pylist()) == 2  # both recorded
    assert (tmp_path / "out" / "runs" / "r" / "report.html").stat().st_size > 0  # and reported
    # the flow checks the input before the work too, and fails at once: an overlay (whose weight cannot be
    # estimated) over a dataset without an alpha column
    pq.write_table(pq.read_table(tmp_path / "obs").drop_columns(["alpha"]), tmp_path / "obs" / "shard-00000.parquet")
    config.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "forward": {"name": "overlay"}}))
    with pytest.raises(ConfigError, match=r"Add --set forward\.alpha=0\.5$"):
        clean_dataset(str(tmp_path / "obs"), str(tmp_path / "out2"), config=str(config), progress=False)


def test_an_ingested_folder_trains_a_prior_and_becomes_a_test_set_with_truth(ingested, tmp_path, capsys):
    from pipeline.data.datasets import load_images
    from pipeline.data.shards import decode_image, to_float

    obs = ingested
    cfg = _tiny_yaml(tmp_path, steps=2, every=2)
    cli(capsys, "train", "--config", str(cfg), "--quiet", "--set", f"data.source={obs}")
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["meta"]
    assert meta["dataset"] == str(obs) and meta["n_train_images"] == len(PHOTOS) and meta["steps"] == 2

    cli(capsys, "corrupt", str(obs), "digits", str(tmp_path / "test"), "--size", "16")
    test = pq.read_table(tmp_path / "test").to_pylist()
    truth = load_images(str(obs), size=16, channels=1)
    assert sorted(r["id"].split("+")[0] for r in test) == sorted(truth.ids)  # one per photo, truth kept
    for r in test:
        clean = to_float(decode_image(r["clean"]["bytes"], r["clean"]["path"]))
        assert np.abs(clean - truth.images[truth.ids.index(r["id"].split("+")[0])]).max() <= 1 / 255 + 1e-6

    # a test set has both corrupted images and their truth: which to train on must be said
    proc = cli(capsys, "train", "--config", str(cfg), "--quiet", "--set", f"data.source={tmp_path / 'test'}",
                     check=False)
    last = proc.stderr.strip().splitlines()[-1]  # after the "training prior ..." line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and last.startswith("jointdiff: "), proc.stderr
    assert "have 'observation' and 'clean'" in last
    assert "choose one with --set data.column=clean or --set data.column=observation" in proc.stderr
    proc = cli(capsys, "train", "--config", str(cfg), "--quiet", "--set", f"data.source={tmp_path / 'test'}",
                     "--set", "data.column=image", check=False)
    assert proc.returncode == 2 and "no column 'image' (the shards have id, observation, clean" in proc.stderr


def test_forward_alpha_auto_estimates_every_row_and_measures_it_against_the_alpha_column(tiny_priors, tmp_path):
    """A corrupted dataset knows its alpha (0.5): with forward.alpha=auto it is estimated anyway, and the column
    becomes the truth of alpha_error."""
    _observations(str(tmp_path / "obs"), n=4, shard_size=4, bad_row=False)
    cfg = _cfg(tiny_priors, steps=2).model_copy(update={"forward": ForwardConfig(alpha="auto")})
    summary = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False)
    assert (summary["cleaned"], summary["alpha_estimated"]) == (4, 4)
    m = pq.read_table(str(tmp_path / "out" / "runs" / "r" / "metrics")).to_pylist()
    for r in m:
        assert r["alpha"] == 0.5 and 0.02 <= r["alpha_hat"] <= 0.98
        assert r["alpha_error"] == pytest.approx(abs(r["alpha_hat"] - 0.5), abs=1e-6)
    assert summary["alpha_error_median"] == pytest.approx(float(np.median([r["alpha_error"] for r in m])), abs=1e-6)
    # the report plots each estimate against the given alpha: one point per image, and the diagonal
    report = (tmp_path / "out" / "runs" / "r" / "report.html").read_text()
    scatter = report[report.index('data-plot="alpha-scatter"'):]
    scatter = scatter[:scatter.index("</svg>")]
    assert scatter.count('class="point"') == 4 and 'class="diagonal"' in scatter
