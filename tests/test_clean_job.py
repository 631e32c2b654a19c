"""The Ray cleaning job (pipeline.jobs.clean) and the Prefect flow (flows.clean_dataset), on a real local Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.config import CleanConfig, RayConfig, SamplerConfig
from pipeline.data.accounting import check_run
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded
from pipeline.data.shards import decode_image, read_table, to_float
from pipeline.data.storage import open_fs
from pipeline.jobs.clean import run_clean
from pipeline.metrics import psnr, ssim
from pipeline.run.local import run_local
from pipeline.summary import read_parts, read_summaries

REPO = Path(__file__).resolve().parents[1]


def _edit_shard(uri: str, shard: str, edit) -> None:
    fs, root = open_fs(uri)
    path = f"{root.rstrip('/')}/{shard}"
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    rows = table.to_pylist()
    edit(rows)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f)


def _observations(uri: str, n: int, shard_size: int, bad_row: bool = True, dup_in: str | None = None) -> str | None:
    """Observation shards; optionally a truncated PNG at shard 0 row 1, and shard 0 row 0's id copied
    into row 0 of ``dup_in`` (returned)."""
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), n, seed=0)
    write_observations(uri, obs, shard_size=shard_size)
    if bad_row:  # one error row; the rest of the run goes on

        def truncate(rows):
            rows[1]["observation"] = {"bytes": rows[1]["observation"]["bytes"][:40], "path": "x.png"}
        _edit_shard(uri, "shard-00000.parquet", truncate)
    if dup_in:
        dup = obs.ids[0]

        def copy_id(rows):
            rows[0]["id"] = dup
        _edit_shard(uri, dup_in, copy_id)
        return dup
    return None


def _cfg(priors, steps: int = 3, **ray) -> CleanConfig:
    return CleanConfig(priors={"image": priors[0], "noise": priors[1]}, sampler=SamplerConfig(steps=steps),
                       batch_size=2, device="auto", ray=RayConfig(**ray))


def _table(uri: str) -> pa.Table:
    return read_parts(uri)  # every non-empty .parquet file under uri, as one table


def _img(cell) -> torch.Tensor:
    return torch.from_numpy(to_float(decode_image(cell["bytes"], cell["path"]))).reshape(1, 1, 16, 16)


def test_one_verb_cleans_on_s3_with_both_executors_to_the_same_images_and_metrics_that_match_them(
        s3, ray_local, tiny_priors, tmp_path, capsys):
    from pipeline.cli import main

    bucket, _ = s3
    fs, _ = open_fs(bucket)
    models = []
    for name, local in zip(("img", "noise"), tiny_priors):  # the actors load the priors from the bucket
        fs.put(local, f"{bucket.removeprefix('s3://')}/models/{name}", recursive=True)
        models.append(f"{bucket}/models/{name}")
    dup = _observations(f"{bucket}/obs", n=8, shard_size=3, dup_in="shard-00002.parquet")
    sets = ["--set", f"priors.image={models[0]}", "--set", f"priors.noise={models[1]}", "--set", "sampler.steps=3",
            "--set", "batch_size=2", "--set", "device=cpu", "--quiet",
            # the same thread count in both executors: a float sum's order, so the last bit, depends on it
            "--set", "threads=2", "--set", "ray.threads_per_actor=2"]

    def clean(executor: str, out: str) -> dict:
        assert main(["clean", f"{bucket}/obs", out, "--executor", executor, *sets]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    summary = clean("ray", f"{bucket}/out")
    assert (summary["inputs"], summary["cleaned"], summary["errors"], summary["executor"]) == (8, 6, 2, "ray")
    run = summary["output"]
    assert run.startswith(f"{bucket}/out/runs/run-") and check_run(f"{bucket}/obs", run).ok
    markers = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{run.removeprefix('s3://')}/_done/*.json")]
    assert len(markers) == 3 and all(m["node_id"] for m in markers)  # cleaned by Ray actors

    cleaned, metrics = _table(f"{run}/cleaned"), _table(f"{run}/metrics")
    ids = cleaned.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 and set(ids) == set(metrics.column("id").to_pylist()) and dup in ids
    assert pa.types.is_timestamp(metrics.schema.field("started_at").type)
    errors = sorted(_table(f"{run}/errors").to_pylist(), key=lambda e: e["shard"])
    assert [(e["shard"], e["row"], e["stage"]) for e in errors] == [("shard-00000.parquet", 1, "decode"),
                                                                    ("shard-00002.parquet", 0, "validate")]
    assert errors[1]["id"] == dup and "duplicate id" in errors[1]["reason"]
    assert metrics.filter(pc.equal(metrics.column("id"), dup)).column("shard").to_pylist() == [
        "shard-00000.parquet"]  # the first copy is the one cleaned

    # the metrics are what pipeline.metrics computes on the images written (16-bit PNG)
    truth = {(f"shard-0000{k}.parquet", r): row for k in range(3)  # by (shard, row): the repeated id is in two
             for r, row in enumerate(read_table(f"{bucket}/obs/shard-0000{k}.parquet").to_pylist())}
    by_id = {m["id"]: m for m in metrics.to_pylist()}
    for row in cleaned.to_pylist():
        m = by_id[row["id"]]
        t = truth[(m["shard"], m["row"])]
        den, clean_, obs = _img(row["denoised"]), _img(t["clean"]), _img(t["observation"])
        assert abs(float(psnr(den, clean_)) - m["psnr"]) < 1e-3 and abs(float(ssim(den, clean_)) - m["ssim"]) < 1e-4
        assert abs(float(psnr(obs, clean_)) - m["psnr_input"]) < 1e-3 and m["nfe"] == 3 and row["nfe"] == 3

    # the local executor: the same run id (the execution is no part of it) and the same images
    local = clean("local", str(tmp_path / "local"))
    assert (local["run_id"], local["config_hash"], local["executor"]) == (summary["run_id"], summary["config_hash"],
                                                                          "local")
    single = {r["id"]: r for r in _table(str(Path(local["output"].removeprefix("file://")) / "cleaned")).to_pylist()}
    assert set(single) == set(ids)
    for row in cleaned.to_pylist():
        assert row["model_ids"] == single[row["id"]]["model_ids"] == (
            f"{models[0]}@sha256:{summary_models(summary)[0]}+{models[1]}@sha256:{summary_models(summary)[1]}")
        for col in ("denoised", "noise_estimate"):
            assert np.array_equal(decode_image(row[col]["bytes"]), decode_image(single[row["id"]][col]["bytes"]))

    history = read_summaries(f"{bucket}/out")
    assert history.num_rows == 1 and history.column("cleaned").to_pylist() == [6]
    # each executor writes the run's report and says where it is
    for s in (summary, local):
        assert s["report"] == f"{s['output']}/report.html"
    assert open_fs(summary["report"])[0].exists(summary["report"].removeprefix("s3://"))


def summary_models(summary: dict) -> list[str]:
    """The fingerprint prefixes the summary row records for the image and the noise prior."""
    models = json.loads(summary["models"])
    return [models[k].rsplit("@sha256:", 1)[1] for k in ("image", "noise")]


def test_a_resumed_run_decides_duplicates_as_a_fresh_one_whatever_finished_first(tiny_priors, tmp_path):
    from pipeline.run import Run
    from pipeline.run.shard import ShardCleaner, clean_shard

    dup = _observations(str(tmp_path / "obs"), n=6, shard_size=2, bad_row=False, dup_in="shard-00002.parquet")
    cfg = _cfg(tiny_priors)
    first = Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, "r").plan()
    assert first.duplicates == {"shard-00002.parquet": {0: f"duplicate id {dup!r} (an earlier row of this run has it)"}}
    # the later shard finishes first (as on Ray), then the run stops
    clean_shard(ShardCleaner(first.cfg, first.pinned), first,
                next(s for s in first.shards if s.name == "shard-00002.parquet"))
    resumed = Run.open(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, "r").plan()
    assert resumed.duplicates == first.duplicates and [s.name for s in resumed.pending] == [
        "shard-00000.parquet", "shard-00001.parquet"]
    summary = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False)
    assert (summary["cleaned"], summary["errors"], summary["skipped_shards"]) == (5, 1, 1)
    metrics = pq.read_table(tmp_path / "out" / "runs" / "r" / "metrics").to_pylist()
    assert [m["shard"] for m in metrics if m["id"] == dup] == ["shard-00000.parquet"]


def test_a_killed_actor_is_replaced_and_nothing_is_lost_or_duplicated(ray_local, tiny_priors, tmp_path):
    _observations(str(tmp_path / "obs"), n=10, shard_size=2)
    crash = tmp_path / "crashed"
    cfg = _cfg(tiny_priors, actors=2, gpus_per_actor=0, threads_per_actor=1)
    summary = run_clean(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False,
                        crash_once=str(crash))
    dead_pid, dead_shard = crash.read_text().split()  # an actor really died (os._exit) mid-shard
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (10, 9, 1)
    results = summary["job"]["shards"]
    assert sorted(r["shard"] for r in results) == [f"shard-0000{k}.parquet" for k in range(5)]  # each once
    redone = [r for r in results if r["shard"] == dead_shard]
    assert len(redone) == 1 and str(redone[0]["pid"]) != dead_pid  # redone by the replacement actor
    run = tmp_path / "out" / "runs" / "r"
    ids = pq.read_table(run / "cleaned").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9 and check_run(str(tmp_path / "obs"), str(run)).ok


def test_a_shard_that_kills_every_actor_is_given_up_and_the_run_completes(ray_local, tiny_priors, tmp_path):
    from pipeline.jobs.clean import MAX_SHARD_ATTEMPTS

    _observations(str(tmp_path / "obs"), n=4, shard_size=2, bad_row=False)
    cfg = _cfg(tiny_priors, actors=1, gpus_per_actor=0, threads_per_actor=1)
    summary = run_clean(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False,
                        crash_shard="shard-00001.parquet")
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (4, 2, 2)
    run = tmp_path / "out" / "runs" / "r"
    errors = pq.read_table(run / "errors" / "shard-00001.parquet").to_pylist()
    assert [e["row"] for e in errors] == [0, 1] and all("gave up after 3 attempts" in e["reason"] for e in errors)
    attempts = json.loads((run / "_attempts" / "shard-00001.json").read_text())["attempts"]
    assert attempts == MAX_SHARD_ATTEMPTS + 1  # three deaths, then the giving up


def test_a_run_stopped_half_way_finishes_only_the_missing_shards(ray_local, tiny_priors, tmp_path):
    _observations(str(tmp_path / "obs"), n=8, shard_size=2, bad_row=False)
    # enough steps that a shard takes seconds (about 2 s here; one actor cleans them one after the other), far
    # more than Ctrl-C takes to stop the job once the second marker is seen
    cfg = _cfg(tiny_priors, steps=100, actors=1, gpus_per_actor=0, threads_per_actor=1)
    config = tmp_path / "clean.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "out" / "runs" / "r"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "job.log"
    with open(log, "w") as out:  # a file, not a pipe nobody reads while the job runs
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.jobs.clean", str(tmp_path / "obs"),
                                 str(tmp_path / "out"), "--config", str(config), "--run-id", "r", "--quiet"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while len(list((run / "_done").glob("*.json")) if (run / "_done").exists() else []) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the job marked no 2 shards in 240 s:\n" + log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        marked_at_signal = len(list((run / "_done").glob("*.json")))
        proc.wait(timeout=120)
    assert proc.returncode != 0, f"the job finished ({marked_at_signal} markers at Ctrl-C):\n{log.read_text()}"
    # it says how far it got and how to resume, in one line, without a traceback
    assert proc.returncode == 130 and "Traceback" not in log.read_text(), log.read_text()
    assert re.search(r"interrupted: \d+ of 4 shard\(s\) of run r are complete in .*/out/runs/r\. Run the same "
                     r"command again to resume", log.read_text()), log.read_text()
    try:  # and whatever of its local Ray is left: no straggler may write after the snapshot below
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(1)
    done_before = {p.name.replace(".json", ".parquet"): p.stat().st_mtime_ns for p in (run / "_done").iterdir()}
    assert 2 <= len(done_before) < 4, done_before

    summary = run_clean(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, run_id="r", progress=False)
    redone = sorted(r["shard"] for r in summary["job"]["shards"])
    assert redone == sorted({f"shard-{k:05d}.parquet" for k in range(4)} - set(done_before))
    assert summary["skipped_shards"] == len(done_before) and summary["cleaned"] == 8
    assert all((run / "_done" / s.replace(".parquet", ".json")).stat().st_mtime_ns == t for s, t in done_before.items())
    ids = pq.read_table(run / "cleaned").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and check_run(str(tmp_path / "obs"), str(run)).ok


def test_the_prefect_flow_records_the_run_and_publishes_artifacts(prefect_harness, ray_local, tiny_priors, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.clean_dataset import clean_dataset

    _observations(str(tmp_path / "obs"), n=5, shard_size=3)
    config = tmp_path / "clean.yaml"
    config.write_text(yaml.safe_dump(_cfg(tiny_priors).model_dump(mode="json")))
    state = clean_dataset(str(tmp_path / "obs"), str(tmp_path / "out"), config=str(config),
                          overrides=["sampler.steps=2"], progress=False, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert (summary["inputs"], summary["cleaned"], summary["errors"], summary["nfe"]) == (5, 4, 1, 2)
    history = read_summaries(str(tmp_path / "out")).to_pylist()
    assert len(history) == 1 and history[0]["run_id"] == summary["run_id"] and history[0]["psnr_mean"] > 0
    assert history[0]["images_per_s"] > 0 and history[0]["config_hash"] == summary["config_hash"]

    key = summary["run_id"].lower()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"clean-summary-{key}", f"clean-outputs-{key}", f"clean-report-{key}"])))
    by_key = {a.key: a for a in arts}
    assert {k: a.type for k, a in by_key.items()} == {  # Prefect stores a link artifact as markdown
        f"clean-summary-{key}": "table", f"clean-outputs-{key}": "markdown", f"clean-report-{key}": "markdown"}
    data = by_key[f"clean-summary-{key}"].data
    table = json.loads(data) if isinstance(data, str) else data
    assert table[0]["cleaned"] == 4 and table[0]["run_id"] == summary["run_id"]
    outputs = by_key[f"clean-outputs-{key}"].data
    assert f"{summary['output']}/metrics/" in outputs
    # the report is written by the flow and linked from its artifacts
    report = tmp_path / "out" / "runs" / summary["run_id"] / "report.html"
    assert summary["report"] == f"{summary['output']}/report.html" and report.stat().st_size > 0
    assert f"[report.html]({summary['report']})" in outputs
    assert by_key[f"clean-report-{key}"].data == f"[report of run {summary['run_id']}]({summary['report']})"
    assert report.read_text().count('class="panel"') == 4 * 4  # the 4 cleaned, each once (one group), 4 panels


def test_the_summary_row_without_ground_truth_has_reference_free_figures(tiny_priors, tmp_path):
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 3, seed=1)
    write_observations(str(tmp_path / "obs"), obs, shard_size=3)
    t = read_table(str(tmp_path / "obs" / "shard-00000.parquet")).drop_columns(["clean", "noise"])
    pq.write_table(t, tmp_path / "obs" / "shard-00000.parquet")
    row = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), _cfg(tiny_priors), progress=False)
    assert row["psnr_mean"] is None and row["ssim_p05"] is None and row["psnr_input_mean"] is None
    assert row["residual_mean"] > 0 and row["removed_energy_mean"] > 0 and row["cleaned"] == 3


def test_ray_settings_are_validated_from_the_file_and_from_flags():
    from pipeline.config import ConfigError, with_ray

    with pytest.raises(ValueError, match="actorz"):
        CleanConfig.model_validate({"ray": {"actorz": 2}})
    with pytest.raises(ConfigError, match="actors"):
        with_ray(CleanConfig(), actors=0)
    assert with_ray(CleanConfig(), actors=3, address=None).ray.actors == 3


def test_the_flow_refuses_credentials_as_parameters(prefect_harness, tmp_path):
    from flows.clean_dataset import clean_dataset
    from pipeline.config import ConfigError

    # refused before Prefect creates (and stores) the run: tests/test_secrets.py has every spelling
    with pytest.raises(ConfigError, match=r"--set storage.secret=\.\.\.: only storage.endpoint_url"):
        clean_dataset(str(tmp_path / "obs"), str(tmp_path / "out"), overrides=["storage.secret=hunter2"])


def test_an_actor_layout_no_node_can_host_fails_at_once(ray_local):
    from pipeline.config import ConfigError, with_ray
    from pipeline.jobs.clean import actor_layout

    assert actor_layout(CleanConfig(), 10) == (1, 1.0, 2)  # the one logical GPU: one GPU actor
    assert actor_layout(with_ray(CleanConfig(), gpus_per_actor=0, threads_per_actor=1), 10) == (4, 0.0, 1)
    # CPU actors: one thread each while there are at least as many shards as CPUs, more for fewer
    assert actor_layout(with_ray(CleanConfig(), gpus_per_actor=0), 10) == (4, 0.0, 1)
    assert actor_layout(with_ray(CleanConfig(), gpus_per_actor=0), 2) == (2, 0.0, 2)
    assert actor_layout(with_ray(CleanConfig(), gpus_per_actor=0), 1) == (1, 0.0, 4)
    assert actor_layout(with_ray(CleanConfig(), gpus_per_actor=0, actors=1), 10) == (1, 0.0, 4)  # one asked for
    with pytest.raises(ConfigError, match="no live node has that many GPUs"):
        actor_layout(with_ray(CleanConfig(), gpus_per_actor=2), 10)
    with pytest.raises(ConfigError, match="no live node has that many CPUs"):
        actor_layout(with_ray(CleanConfig(), gpus_per_actor=0, threads_per_actor=16), 10)

    # an autoscaling cluster adds the nodes later: the explicit layout stands, and must be explicit
    assert actor_layout(with_ray(CleanConfig(), autoscaling=True, actors=8, gpus_per_actor=2), 10) == (8, 2.0, 2)
    assert actor_layout(with_ray(CleanConfig(), autoscaling=True, actors=8, gpus_per_actor=1), 3) == (3, 1.0, 2)
    with pytest.raises(ConfigError, match="ray.autoscaling needs ray.actors and ray.gpus_per_actor"):
        with_ray(CleanConfig(), autoscaling=True, actors=8)


def _session_processes(sid: int) -> list[str]:
    """``pid command`` of the live (not zombie) processes of session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            out.append(f"{name} {cmd[:100]}")
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_nothing_of_a_killed_drivers_local_ray_outlives_it_or_writes_after_it(tiny_priors, tmp_path):
    _observations(str(tmp_path / "obs"), n=4, shard_size=2, bad_row=False)
    # slow shards, so that the driver dies while both actors are half-way through one
    cfg = _cfg(tiny_priors, steps=2000, actors=2, gpus_per_actor=0, threads_per_actor=1)
    config = tmp_path / "clean.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "out" / "runs" / "r"
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.jobs.clean", str(tmp_path / "obs"),
                                 str(tmp_path / "out"), "--config", str(config), "--run-id", "r", "--quiet"],
                                cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(list((run / "_attempts").glob("*.json")) if (run / "_attempts").exists() else []) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the actors started no shard in 240 s:\n" + log.read_text()
            time.sleep(0.1)
        time.sleep(2)  # sampling now
        assert not (run / "_done").exists(), "a shard finished before the driver was killed; use more steps"
        proc.kill()  # SIGKILL: no handler runs, no ray.shutdown
        proc.wait()
        killed = time.time()
        left = _session_processes(proc.pid)
        while left and time.time() < killed + 20:
            time.sleep(0.5)
            left = _session_processes(proc.pid)
        assert not left, f"processes of the killed driver's Ray still alive 20 s after it: {left}"
        written = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.stat().st_mtime > killed]
        assert not written, f"written after the driver was killed: {written}"
    finally:
        for line in _session_processes(proc.pid):
            os.kill(int(line.split()[0]), signal.SIGKILL)
