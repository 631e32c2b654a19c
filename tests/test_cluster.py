"""Reaching a real cluster: ``ray start --head`` on 127.0.0.1 (the session's, tests/conftest.py ``ray_cluster``,
or a two-node one of the test's own), driven as a user drives it: the ``jointdiff`` command in a fresh folder,
relative paths, ``--ray-address HEAD:6379`` / ``auto``; addresses that cannot work refused up front; a node
lost half-way through a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data.accounting import check_run
from pipeline.data.shards import decode_image
from pipeline.run.identity import identify
from pipeline.run.local import run_local
from pipeline.run.recipe import resolve
from tests.raycluster import VENV_BIN, Cluster
from tests.test_clean_job import _cfg, _observations

REPO = Path(__file__).resolve().parents[1]
JOINTDIFF = str(VENV_BIN / "jointdiff")  # the installed command, as a user in another folder runs it


def _folder_with_data(tmp_path: Path, tiny_priors, n: int, shard_size: int, steps: int, **ray) -> Path:
    """A fresh folder holding observation shards (``obs/``) and a clean config (``clean.yaml``), no code."""
    folder = tmp_path / "user"
    _observations(str(folder / "obs"), n=n, shard_size=shard_size, bad_row=False)
    cfg = _cfg(tiny_priors, steps=steps, gpus_per_actor=0, threads_per_actor=1, **ray)
    (folder / "clean.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return folder


def _error_lines(text: str) -> list[str]:
    """Lines logged at ERROR level (Python's logging or Ray's C++ ``[date E pid tid]`` format)."""
    return [ln for ln in text.splitlines() if " ERROR " in ln or (ln.startswith("[") and " E " in ln.split("]")[0])]


# ---------------------------------------------------------------------------------------------------
# Addresses that cannot run a job: one line, before any work

@pytest.mark.parametrize("how", ["flag", "env", "train", "jobs-api", "nothing-there"])
def test_a_ray_client_or_jobs_api_address_is_refused_up_front_with_what_to_use(how, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if how == "flag":
        argv = ["clean", "missing-input", "out", "--ray-address", "ray://head:10001"]
    elif how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
        argv = ["clean", "missing-input", "out"]
    elif how == "train":
        argv = ["train", "--config", str(REPO / "configs" / "prior_digits.yaml"), "--ray-address", "ray://head:10001"]
    elif how == "jobs-api":
        argv = ["clean", "missing-input", "out", "--ray-address", "http://head:8265"]
    else:  # a port nothing listens on: Ray would retry for minutes
        from tests.raycluster import free_ports

        argv = ["clean", "missing-input", "out", "--ray-address", f"127.0.0.1:{free_ports(1)[0]}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback, and not about the missing input
    if how == "nothing-there":
        assert f"--ray-address {argv[-1]}: nothing answers there" in err and "ray start --head" in err
    elif how == "jobs-api":
        assert "jointdiff submit clean" in err and "HEAD:6379" in err
    else:
        assert "ray://head:10001" in err and "Ray Client" in err and "HEAD:6379" in err and "jointdiff submit" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# A driver on the cluster: --ray-address HEAD:6379, then auto; relative paths are one dataset

def test_clean_runs_on_a_ray_start_head_from_a_fresh_folder_with_relative_paths(ray_cluster, tiny_priors, tmp_path):
    folder = _folder_with_data(tmp_path, tiny_priors, n=6, shard_size=3, steps=2)
    env = ray_cluster.client_env()
    # a user on the head's machine: the token where `ray start --head` found it (~/.ray/auth_token), and no
    # RAY_AUTH_MODE (Ray 2.60's head turns token authentication on by itself then, a driver does not)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(ray_cluster.token)
    user = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")} | {"HOME": str(home)}
    proc = subprocess.run([JOINTDIFF, "clean", "obs", "out", "--config", "clean.yaml", "--ray-address",
                           ray_cluster.gcs, "--quiet"], cwd=folder, env=user, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    # the outputs are where the user asked (not in Ray's working directory on the workers)
    run = folder / "out" / "runs" / summary["run_id"]
    assert summary["output"] == f"file://{run}" and check_run(str(folder / "obs"), str(run)).ok
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (6, 6, 0)
    assert not _error_lines(proc.stderr), proc.stderr  # Ray's ERROR line about actor arguments is gone
    # obs, ../user/obs and /abs/obs are one dataset: one run id
    cfg = _cfg(tiny_priors, steps=2, gpus_per_actor=0, threads_per_actor=1)
    pinned = resolve(cfg.recipe)
    assert identify(pinned, str(folder / "obs")) == identify(pinned, f"file://{folder}/obs")
    assert identify(pinned, str(folder / "obs")).run_id == summary["run_id"]
    (folder / "sub").mkdir()
    again = subprocess.run([JOINTDIFF, "clean", "../obs", "../out", "--config", "../clean.yaml", "--quiet"],
                           cwd=folder / "sub", env={**env, "RAY_ADDRESS": "auto"}, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.splitlines()[-1])
    assert second["run_id"] == summary["run_id"] and second["processed"] == 0 and second["skipped_shards"] == 2


def test_the_session_ray_ignores_a_stale_cluster_left_by_a_killed_ray_start():
    """A ``ray start --head`` killed hard leaves ``ray_current_cluster`` behind; the test suite's own Ray
    (``start_test_ray``, as the product's ``init_ray``) must start a new local instance, not try to join it."""
    tmp_path = Path(tempfile.mkdtemp(prefix="jd-stale-", dir="/tmp"))  # short: Ray's socket paths
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # a dead address
    code = ("from tests.conftest import start_test_ray; import ray; start_test_ray(); "
            "print(ray.cluster_resources()['CPU']); ray.shutdown()")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "4.0"


def test_a_job_entry_on_a_python_without_the_requirements_says_what_is_missing_in_one_line(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if not bare or subprocess.run([bare, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip("no Python without numpy on this machine")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JOINTDIFF_ENTRY_REEXEC": "1"}
    proc = subprocess.run([bare, "-m", "pipeline.jobs.entry", "clean", "in", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert bare in line and "numpy" in line and "torch" in line and "pip install jointdiff" in line


# ---------------------------------------------------------------------------------------------------
# A node lost half-way

def _records(run: Path, sub: str) -> dict[str, dict]:
    out = {}
    for p in (run / sub).glob("*.json") if (run / sub).exists() else []:
        try:
            out[p.name.replace(".json", ".parquet")] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):  # being written
            continue
    return out


def _images(run: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(run / "cleaned", columns=["id", "denoised"]).to_pylist()
    return {r["id"]: decode_image(r["denoised"]["bytes"], r["denoised"]["path"]).astype(np.int64) for r in table}


def test_a_node_lost_half_way_loses_nothing_and_changes_no_pixel(tiny_priors, tmp_path):
    deadline = time.time() + 300  # the whole test, cluster start included
    folder = _folder_with_data(tmp_path, tiny_priors, n=16, shard_size=2, steps=30, actors=3, stall_timeout_s=5)
    # one actor on the head, two on the worker node; the head declares a node dead after 3 failed health checks
    # 1 s apart (Ray's defaults: 5, 3 s apart), so the stall check finds it gone within its 5 s
    cluster = Cluster(num_cpus=1, project_env=True,
                      system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
    try:
        worker = cluster.add_worker(num_cpus=2)
        head_id, worker_id = cluster.node_id(0), cluster.node_id(worker)
        log = open(tmp_path / "job.log", "w")
        # The head's actor never finishes its second shard, nor does one of the worker node's actors (a test hook),
        # so a shard is surely in progress on the worker node when it is killed. Once the worker node is lost, no
        # actor is left to work and Ray Data cannot place new ones: only the driver's stall check (5 s without a
        # finished shard, fewer live actors than planned) can finish the run, with a fresh pool on the head.
        hang, stuck = f"{tmp_path}/hang@{head_id}", f"{tmp_path}/stuck@{worker_id}"
        job = subprocess.Popen([JOINTDIFF, "clean", "obs", "out", "--config", "clean.yaml", "--run-id", "r",
                                "--ray-address", cluster.gcs, "--quiet"], cwd=folder,
                               env={**cluster.client_env(), "JOINTDIFF_TEST_HANG_ONCE": f"{hang},{stuck}"},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        run = folder / "out" / "runs" / "r"
        while True:  # until shards are done on both nodes and one is stuck on the worker node
            done, attempts = _records(run, "_done"), _records(run, "_attempts")
            pending_on_worker = sorted(s for s, a in attempts.items()
                                       if a.get("node_id") == worker_id and s not in done)
            if ({head_id, worker_id} <= {d.get("node_id") for d in done.values()} and pending_on_worker
                    and Path(stuck.split("@")[0]).exists()):
                break
            assert job.poll() is None, (tmp_path / "job.log").read_text()
            assert time.time() < deadline - 60, "no shards on both nodes:\n" + (tmp_path / "job.log").read_text()
            time.sleep(0.2)
        cluster.kill_node(worker)
        time.sleep(1)  # the node's processes are gone: what has no marker now was pending on it when it died
        done = _records(run, "_done")
        pending_on_worker = [s for s in pending_on_worker if s not in done]
        assert pending_on_worker, "the worker node finished its shards as it was killed; none was pending"
        job.wait(timeout=max(10, deadline - time.time() - 30))
        log.close()
        text = (tmp_path / "job.log").read_text()
        assert job.returncode == 0, text
    finally:
        cluster.stop()
    assert len(done) < 8, "every shard was done before the node died"
    assert Path(hang.split("@")[0]).exists() and "re-planning the pending shards on the nodes left" in text, text
    after = _records(run, "_done")
    assert {after[s]["node_id"] for s in pending_on_worker} == {head_id}  # redone on the surviving node
    assert check_run(str(folder / "obs"), str(run)).ok  # every input row exactly once
    cleaned = _images(run)
    assert len(cleaned) == 16
    cfg = _cfg(tiny_priors, steps=30)
    run_local(str(folder / "obs"), str(tmp_path / "reference"), cfg, run_id="r", progress=False)
    reference = _images(tmp_path / "reference" / "runs" / "r")
    assert reference.keys() == cleaned.keys()
    worst = max(int(np.abs(cleaned[k] - reference[k]).max()) for k in cleaned)
    assert worst <= 1, f"a pixel differs by {worst} 16-bit steps from the undisturbed run"
