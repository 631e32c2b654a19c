"""The ``jointdiff`` command end to end: as a subprocess where the process itself is what is tested (its entry
point, exit codes, signals, the demo's own services), else run by the CLI's ``main`` in this process
(tests/conftest.py ``cli``: the same parsing, messages and exit codes, without an interpreter that imports
torch again)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline.data.shards import read_images
from tests.conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def jointdiff(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=kw.pop("cwd", ROOT), timeout=kw.pop("timeout", 300), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"jointdiff {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _tiny_yaml(tmp_path: Path, steps: int, every: int) -> Path:
    cfg = {"name": "tiny", "data": {"source": "digits", "size": 16},
           "unet": {"image_size": 16, "base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": []},
           "train": {"steps": steps, "batch_size": 8, "checkpoint_every": every, "warmup_steps": 2, "threads": 1},
           "output": str(tmp_path / "run")}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_resumes_after_being_killed(tmp_path):
    cfg = _tiny_yaml(tmp_path, steps=100_000, every=5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config", str(cfg), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = tmp_path / "run" / "state" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert killed_at >= 10
    done = jointdiff("train", "--config", str(cfg), "--quiet", "--set", f"train.steps={killed_at + 3}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["start_step"] == killed_at
    assert summary["steps"] == killed_at + 3
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["meta"]
    assert meta["steps"] == killed_at + 3 and meta["heldout_loss"] > 0


def test_ctrl_c_saves_state_and_says_how_to_resume(tmp_path):
    cfg = _tiny_yaml(tmp_path, steps=100_000, every=7)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config", str(cfg), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "run" / "state" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not latest.exists():  # the training loop is running
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert json.loads(latest.read_text())["step"] == step >= 7  # saved at the interrupt, due or not


def test_bad_config_exits_with_a_message_not_a_traceback(tmp_path):
    cfg = _tiny_yaml(tmp_path, 1, 1)
    proc = jointdiff("train", "--config", str(cfg), "--set", "train.stepz=3", check=False)
    assert proc.returncode == 2 and "train.stepz" in proc.stderr and "Traceback" not in proc.stderr


def test_export_embedded_writes_readable_shards(tmp_path, capsys):
    cli(capsys, "export-embedded", "digits", str(tmp_path / "d"), "--split", "val", "--n", "30",
              "--shard-size", "12", "--bits", "16")
    ids, arrays = read_images(str(tmp_path / "d"))
    assert len(ids) == 30 and ids[0] == "digits-val-01400"
    assert arrays[0].dtype == np.uint16 and arrays[0].shape == (32, 32)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]


def test_train_on_a_shard_uri_then_sample(tmp_path, capsys):
    cli(capsys, "export-embedded", "digits", str(tmp_path / "d"), "--size", "16", "--n", "64")
    cfg = _tiny_yaml(tmp_path, steps=3, every=3)
    cli(capsys, "train", "--config", str(cfg), "--quiet", "--set", f"data.source={tmp_path / 'd'}")
    out = tmp_path / "grid.png"
    proc = cli(capsys, "sample", str(tmp_path / "run" / "model"), "--n", "6", "--nrow", "3", "--steps", "5",
               "--out", str(out), "--quiet", "--nearest")
    grid = np.asarray(Image.open(out))
    assert grid.shape == ((16 * 2 + 2) * 2 + 2, (16 * 2 + 2) * 3 + 2)
    nearest = json.loads(proc.stdout.strip().splitlines()[-1])["nearest"]
    assert nearest["test_median"] is None and len(nearest["per_sample"]) == 6  # no held-out split in shards
    assert np.asarray(Image.open(tmp_path / "grid_nearest.png")).shape[0] == 2 * grid.shape[0] - 2


def test_sample_refuses_a_pickle(tmp_path):
    import torch

    torch.save({"w": torch.zeros(1)}, tmp_path / "prior.pt")
    proc = jointdiff("sample", str(tmp_path / "prior.pt"), check=False)
    assert proc.returncode == 1 and "pickle" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_corrupts_cleans_with_the_flow_and_says_where_the_outputs_are(tmp_path):
    proc = jointdiff("demo", "--out", str(tmp_path), "--n", "4", "--shard-size", "2", "--steps", "2", "--quiet")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["inputs"], summary["cleaned"], summary["errors"], summary["executor"]) == (4, 4, 0, "ray")
    run = tmp_path / "bucket" / "cleaning" / "runs" / summary["run_id"]
    assert summary["output"] == run.as_uri()
    assert len(list((run / "cleaned").glob("shard-*.parquet"))) == 2 and len(list((run / "_done").iterdir())) == 2
    assert len(list((tmp_path / "bucket" / "cleaning" / "summary").glob("*.parquet"))) == 1
    for text in ("PSNR", "images/s", f"{run}/metrics/", "duckdb -c"):  # local outputs shown as paths
        assert text in proc.stderr, text
    # it ends by pointing at the report the flow wrote
    report = run / "report.html"
    ours = [line for line in proc.stderr.splitlines() if "| INFO" not in line]  # less Prefect's server log
    assert ours[-1].strip() == str(report) and report.stat().st_size > 0
    assert summary["report"] == report.as_uri()


def test_clean_cleans_good_rows_and_rejects_bad_ones(tiny_priors, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    xm, nm = tiny_priors  # the session's (trained as `jointdiff train` trains: pipeline.training.train_prior)
    cli(capsys, "corrupt", "faces", "digits", str(tmp_path / "obs"), "--size", "16", "--n", "5")
    shard = tmp_path / "obs" / "shard-00000.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[1]["observation"] = {"bytes": rows[1]["observation"]["bytes"][:40], "path": "x.png"}  # truncated PNG
    rows.append(dict(rows[0]))  # duplicate id
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    # a second shard holding only a copy of an id from the first: rejected, so it has no cleaned file
    pq.write_table(pa.Table.from_pylist([dict(rows[2])], schema=table.schema), tmp_path / "obs" / "shard-00001.parquet")
    proc = cli(capsys, "clean", str(tmp_path / "obs"), str(tmp_path / "out"), "--config",
               str(ROOT / "configs" / "denoise.yaml"), "--set", f"priors.image={xm}", "--set", f"priors.noise={nm}",
               "--set", "sampler.steps=3", "--set", "batch_size=2", "--run-id", "r1", "--quiet")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {**summary, "run_id": "r1", "inputs": 7, "cleaned": 4, "errors": 3}
    run = tmp_path / "out" / "runs" / "r1"
    cleaned = pq.read_table(run / "cleaned" / "shard-00000.parquet")
    errors = pq.read_table(run / "errors" / "shard-00000.parquet").to_pylist()
    metrics = pq.read_table(run / "metrics" / "run_id=r1" / "shard-00000.parquet")
    assert cleaned.column("id").to_pylist() == [rows[k]["id"] for k in (0, 2, 3, 4)]
    assert sorted(e["row"] for e in errors) == [1, 5]
    assert {e["stage"] for e in errors} == {"decode", "validate"}
    assert "duplicate id" in [e for e in errors if e["row"] == 5][0]["reason"]
    m = metrics.to_pylist()
    assert len(m) == 4 and all(-1 <= r["ssim"] <= 1 and r["psnr"] > 0 and r["residual"] >= 0 for r in m)
    assert all(r["psnr_input"] > 5 and r["nfe"] == 3 for r in m)
    # accounting: every input row once, in cleaned or errors
    assert sorted([r["row"] for r in m] + [e["row"] for e in errors]) == list(range(6))
    second = pq.read_table(run / "errors" / "shard-00001.parquet").to_pylist()
    assert [(e["row"], e["id"]) for e in second] == [(0, rows[2]["id"])] and "duplicate id" in second[0]["reason"]
    # every row of it rejected: no zero-row cleaned or metrics file (they break Hugging Face datasets)
    assert not (run / "cleaned" / "shard-00001.parquet").exists()
    assert not (run / "metrics" / "run_id=r1" / "shard-00001.parquet").exists()
    den = cleaned.column("denoised").to_pylist()[0]
    assert den["path"].endswith(".png")
    assert np.asarray(Image.open(io.BytesIO(den["bytes"]))).shape == (16, 16)


def test_bench_quality_quick_writes_every_row_key(tmp_path, capsys):
    out = tmp_path / "q.json"
    proc = cli(capsys, "bench", "quality", "--quick", "--scenarios", "main", "--n", "2", "--n-val", "2",
               "--steps", "2", "--json", str(out), "--figure", str(tmp_path / "q.png"))
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"observation", "nlm", "tv", "gaussian", "joint-dps", "joint-projection", "joint-paper"} <= methods
    keys = {"method", "rule", "solver", "clean", "noise", "alpha", "steps", "nfe", "backward", "n_images",
            "psnr_mean", "psnr_std", "psnr_median", "ssim_mean", "ssim_std", "ssim_median", "seconds_per_image"}
    for r in rows:
        assert keys <= set(r) and r["n_images"] == 2 and r["clean"] == "faces" and r["noise"] == "digits"
        assert "alpha_error_median" not in r  # a known alpha: only the unknown-alpha scenario measures its error
    proj = [r for r in rows if r["method"] == "joint-projection"][0]
    assert proj["backward"] is False and proj["nfe"] == 2
    assert "| main | joint-dps | 2 | 2 |" in proc.stdout
    # the gaussian baseline: per-pixel, its weights the best of a validation grid that includes 0
    gauss = next(r for r in rows if r["method"] == "gaussian")
    scores = gauss["validation_psnr"]
    assert {"0/20", "20/20"} <= set(scores) and any(k.endswith("/0") for k in scores)
    assert scores[f"{gauss['lambda_x']:g}/{gauss['kappa_n']:g}"] == max(scores.values())
    # the supervised row, where the pair's network ships: one evaluation
    from pipeline.priors import supervised_for

    shipped = supervised_for("faces", "digits") is not None
    assert ("supervised" in methods) == shipped
    assert all(r["nfe"] == 1 for r in rows if r["method"] == "supervised")
    # the figure: rows (observation, joint, [supervised,] gaussian, NLM, truth, noise estimate) of the 2 images
    assert Image.open(tmp_path / "q.png").size == (2 * (96 + 2) + 2, (6 + shipped) * (96 + 2) + 2)
    # the mixed set, where the network ships: half in distribution, half out; routed between fast and joint
    out = tmp_path / "m.json"
    cli(capsys, "bench", "quality", "--quick", "--scenarios", "mixed", "--n", "10", "--steps", "2", "--json", str(out))
    mixed = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert bool(mixed) == shipped
    if shipped:
        assert set(mixed) == {"supervised", "routed-q0.8", "routed-q0.9", "routed-q0.95", "joint-default"}
        assert mixed["supervised"]["routed_fraction"] == 0 and mixed["joint-default"]["routed_fraction"] == 1
        fractions = [mixed[f"routed-q{q}"]["routed_fraction"] for q in ("0.8", "0.9", "0.95")]
        assert fractions == sorted(fractions, reverse=True) and all(r["n_images"] == 10 for r in mixed.values())


def test_a_misspelt_scenario_is_one_line_naming_the_scenarios_there_are(capsys):
    proc = cli(capsys, "bench", "large", "--quick", "--scenarios", "text,stripe", check=False)
    assert proc.returncode == 2 and proc.stderr == ("jointdiff: --scenarios: bench large has no scenario stripe; "
                                                    "choose from text, stripes, unknown-alpha, text-serif, faces "
                                                    "(or none, with --memory)\n")
    proc = cli(capsys, "bench", "large", "--quick", "--scenarios", "none", check=False)  # none: only with --memory
    assert proc.returncode == 2 and "has no scenario none;" in proc.stderr
    proc = cli(capsys, "bench", "quality", "--quick", "--scenarios", "readout", check=False)
    assert proc.returncode == 2 and "no scenario readout; choose from main, stripes, " in proc.stderr
    proc = cli(capsys, "bench", "large", "--quick", "--methods", "joint,supervized", check=False)
    assert proc.returncode == 2 and proc.stderr == ("jointdiff: --methods: bench large has no method supervized; "
                                                    "choose from observation, nlm, tv, bm3d, inpaint, gaussian, "
                                                    "joint, supervised\n")
    proc = cli(capsys, "bench", "quality", "--quick", "--methods", "joint", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("jointdiff: --methods: only bench large takes it;")


def test_bench_quality_unknown_alpha_and_read_out_compare_the_true_estimated_and_guessed_parameters(tmp_path,
                                                                                                    capsys):
    out = tmp_path / "q.json"
    cli(capsys, "bench", "quality", "--quick", "--scenarios", "unknown-alpha,read-out", "--n", "3", "--n-val", "2",
        "--steps", "2", "--json", str(out))
    doc = json.loads(out.read_text())["rows"]
    rows = {r["method"]: r for r in doc if r["scenario"] == "unknown-alpha"}
    assert {"observation", "joint-oracle", "joint-auto", "joint-fixed", "gaussian"} <= set(rows)
    assert all(r["alpha"] is None and r["n_images"] == 3 for r in rows.values())
    # the read-out scenario: the sampler told each image's sigma_y against told nothing; no alpha is estimated
    read_out = [r for r in doc if r["scenario"] == "read-out"]
    assert [(r["method"], r.get("sigma_y")) for r in read_out if r["rule"]] == [
        ("joint-oracle", "per image"), ("joint-fixed", 0.0), ("gaussian", None)]
    assert all(r["alpha"] == 0.5 and "alpha_error_median" not in r for r in read_out)
    auto = rows["joint-auto"]
    assert 0 <= auto["alpha_error_median"] <= auto["alpha_error_mean"] * 3 and auto["alpha_error_mean"] < 0.6
    assert rows["joint-oracle"]["alpha_error_mean"] == 0  # the true weights, reported as they were used
    assert rows["joint-fixed"]["alpha_error_mean"] > 0.05  # 0.5 against weights drawn from [0.2, 0.8]
    # the observations' alphas are drawn per image from [0.2, 0.8] (the fixed guess differs from the truth)
    from pipeline.bench.quality import SCENARIOS, alphas_for

    a = alphas_for(next(s for s in SCENARIOS if s.name == "unknown-alpha"), 50, 0)
    assert 0.2 <= float(a.min()) < 0.3 and 0.7 < float(a.max()) <= 0.8
    # the read-out scenario's observations carry white noise of each image's own sigma_y on top of the blend
    from pipeline.bench.quality import observations, sigmas_for

    sc = next(s for s in SCENARIOS if s.name == "read-out")
    obs, sigma = observations(sc, "test", 20), sigmas_for(sc, 20, 0)
    blend = torch.from_numpy(0.5 * obs.clean + 0.5 * obs.noise).flatten(1)
    y = torch.from_numpy(obs.observation).flatten(1)
    assert 0.005 <= float(sigma.min()) and float(sigma.max()) <= 0.05 and float(sigma.max() - sigma.min()) > 0.02
    assert float(y.min()) >= 0 and float(y.max()) <= 1  # clipped to the sensor's range
    inside = (blend > 0.2) & (blend < 0.8)  # where no clipping reaches: the noise as drawn
    std = torch.stack([(y[k] - blend[k])[inside[k]].std() for k in range(20)])
    assert torch.allclose(std, sigma, rtol=0.15)


def test_ctrl_c_during_clean_says_how_far_it_got_and_how_to_resume(tiny_priors, tmp_path):
    from pipeline.data.corrupt import corrupt, write_observations
    from pipeline.data.embedded import load_embedded

    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 12, seed=0)
    write_observations(str(tmp_path / "obs"), obs, shard_size=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "clean", "obs", "out", "--run-id", "r", "--quiet",
                             "--set", f"priors.image={tiny_priors[0]}", "--set", f"priors.noise={tiny_priors[1]}",
                             "--set", "sampler.steps=80", "--set", "threads=1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = tmp_path / "out" / "runs" / "r" / "_done"
    deadline = time.time() + 240
    while time.time() < deadline and not (done.exists() and any(done.iterdir())):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"of 6 shard(s) of run r are complete in {tmp_path}/out/runs/r. Run the same command again to resume" in err


def test_the_removed_verb_denoise_says_what_replaced_it(capsys):
    from pipeline.cli import main

    assert main(["denoise", "obs", "out", "--set", "sampler.steps=2"]) == 2
    assert capsys.readouterr().err == ("jointdiff: the verb `denoise` was removed; use `jointdiff clean --executor "
                                       "local` (see docs/changelog.md)\n")
