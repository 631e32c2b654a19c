"""Hostile configs, run ids and checkpoints (issue 17, items 1, 7 and 8).

* Run ids become folders (``OUTPUT/runs/RUN_ID``), so a run id that could leave OUTPUT is refused wherever it
  enters: the CLI (one line, exit 2, before any work), the library entry points, the flow, and Prefect's own
  parameter check when a deployment run is created. Row ids never become paths: the ``path`` of an image
  struct is a safe file name; the ``id`` column keeps the raw id.
* YAML is read by one bounded loader: at most 1 MiB of text, 100 aliases, 32 levels of nesting and 100,000
  values once aliases are expanded. The alias bomb of the issue runs in a subprocess capped at 2 GB of address
  space, so a regression fails the test instead of taking the machine down. ``storage.options`` holds plain
  values (or mappings of them, two levels: ``config_kwargs.s3.addressing_style``).
* A prior's ``config.json`` is checked (size, nesting, types, ranges, finiteness) before any network is built,
  with one line naming the file and the key: by the cleaning preflight (exit 2), ``sample`` and training's resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import CleanConfig, ConfigError, SamplerConfig
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded
from pipeline.jobs.clean import main as job_main
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP = 2 * 1024**3  # address space of the subprocesses that meet a bomb


def _one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _capped(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose address space is capped at :data:`MEMORY_CAP`."""
    prog = (f"import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))\n" + code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def obs16(tmp_path_factory) -> str:
    """Two 16x16 observations (the tiny priors' size)."""
    uri = str(tmp_path_factory.mktemp("obs16") / "obs")
    write_observations(uri, corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), 2,
                                    seed=0), shard_size=2)
    return uri


def _tiny_sets(tiny_priors) -> list[str]:
    return ["--set", f"priors.image={tiny_priors[0]}", "--set", f"priors.noise={tiny_priors[1]}",
            "--set", "sampler.steps=2", "--set", "device=cpu", "--set", "batch_size=2"]


# ------------------------------------------------------------------ item 1: run ids
BAD_RUN_IDS = ["../../../X", "a/b", "..", "x..y", ".hidden", "-x", "x" * 129, "", "a b", "run\n1", "a\\b",
               "%2e%2e", "run=1", "é"]


def test_a_run_id_that_leaves_output_is_refused_before_any_work(obs16, tiny_priors, tmp_path, capsys):
    """The issue's probe: ``--run-id ../../../X`` wrote cleaned, errors, markers and metrics above OUTPUT."""
    out = tmp_path / "a" / "b" / "out"
    before = _tree(tmp_path)
    rc = main(["clean", obs16, str(out), "--run-id", "../../../X", "--quiet", *_tiny_sets(tiny_priors)])
    line = _one_line(capsys, rc)
    assert rc == 2, line
    assert line.startswith("jointdiff: --run-id '../../../X': ") and "letters, digits" in line and "'..'" in line
    assert _tree(tmp_path) == before  # nothing written, above OUTPUT or anywhere


@pytest.mark.parametrize("verb", ["clean", "job", "export"])
def test_every_command_refuses_a_bad_run_id_in_one_line(obs16, tiny_priors, tmp_path, capsys, verb):
    out = tmp_path / "out"
    for bad in BAD_RUN_IDS:
        if verb == "export":
            argv = ["export", str(tmp_path), str(tmp_path / "pictures"), f"--run-id={bad}", "--quiet"]
        else:
            argv = ["clean", obs16, str(out), f"--run-id={bad}", "--quiet", *_tiny_sets(tiny_priors)]
        rc = job_main(argv[1:]) if verb == "job" else main(argv)  # `python -m pipeline.jobs.clean`: its own parser
        line = _one_line(capsys, rc)
        assert rc == 2 and line.startswith("jointdiff: --run-id ") and "128" in line, (bad, line)
        assert "\n" not in line and not out.exists() and not (tmp_path / "pictures").exists(), bad


def test_library_entry_points_refuse_a_bad_run_id(obs16, tiny_priors, tmp_path):
    from pipeline.export import resolve_run
    from pipeline.run import Run

    cfg = CleanConfig(priors={"image": tiny_priors[0], "noise": tiny_priors[1]}, device="cpu")
    for bad in ("../x", "a/b", ".."):
        with pytest.raises(ConfigError, match="run id"):
            Run.open(obs16, str(tmp_path / "out"), cfg, run_id=bad)
        with pytest.raises(ConfigError, match="run id"):
            resolve_run(str(tmp_path), run_id=bad)
    assert not (tmp_path / "out").exists()
    good = Run.open(obs16, str(tmp_path / "out"), cfg, run_id="nightly-2024.06.01_a")
    assert good.run_uri.endswith("/out/runs/nightly-2024.06.01_a")


def test_the_flow_refuses_a_bad_run_id_and_prefect_checks_its_schema(obs16, tiny_priors, tmp_path, capsys):
    from prefect.exceptions import ParameterTypeError

    from flows.clean_dataset import clean_dataset
    from flows.clean_dataset import main as flow_main

    # the flow's parameter schema carries the rule, so Prefect refuses the value before a run is created
    schema = json.dumps(clean_dataset.parameters.model_dump_for_openapi()["properties"]["run_id"])
    assert '"maxLength": 128' in schema and '"pattern"' in schema
    with pytest.raises(ParameterTypeError, match="run_id"):
        clean_dataset.validate_parameters({"input_uri": obs16, "output": str(tmp_path), "run_id": "../../x"})
    assert clean_dataset.validate_parameters({"input_uri": obs16, "output": "o", "run_id": "run-1.a_b"})["run_id"] \
        == "run-1.a_b"
    # the flow's body (a direct call of its function) and its command line
    overrides = [f"priors.image={tiny_priors[0]}", f"priors.noise={tiny_priors[1]}", "sampler.steps=2"]
    with pytest.raises(ConfigError, match="run_id"):
        clean_dataset.fn(obs16, str(tmp_path / "out"), overrides=overrides, run_id="../../x")
    capsys.readouterr()  # Prefect's log of the refused parameters above
    rc = flow_main([obs16, str(tmp_path / "out"), "--run-id", "../../x", "--quiet"]
                   + [x for o in overrides for x in ("--set", o)])
    line = _one_line(capsys, rc)
    assert rc == 2 and line.startswith("clean-dataset: --run-id '../../x': "), line
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "x").exists()


def test_a_deployment_run_with_a_bad_run_id_is_refused_by_prefect(prefect_harness, obs16, tmp_path):
    """Prefect 3 deployments enforce the flow's parameter schema when a run is created: the bad value is
    refused by the server, and no flow run (with that value among its stored parameters) exists."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.clean_dataset import clean_dataset

    deployment_id = clean_dataset.to_deployment(name="hostile-run-id").apply()
    with get_client(sync_client=True) as client:
        with pytest.raises(Exception, match="run_id") as refused:
            client.create_flow_run_from_deployment(deployment_id, parameters={
                "input_uri": obs16, "output": str(tmp_path / "out"), "run_id": "../../../X"})
        assert "409 Conflict" in str(refused.value) and "Validation failed for field 'run_id'" in str(refused.value)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        assert runs == []
        ok = client.create_flow_run_from_deployment(deployment_id, parameters={
            "input_uri": obs16, "output": str(tmp_path / "out"), "run_id": "nightly-1"})
        assert ok.parameters["run_id"] == "nightly-1"
        client.delete_flow_run(ok.id)  # never run: no worker serves this deployment
        client.delete_deployment(deployment_id)


HOSTILE_IDS = ["../../x.png", "../escape", "sub/dir/x", "a\\b", "ctrl\x01id\nnext", "..", ".hidden", "é" * 150,
               "/abs/path", "plain-1"]


def _plain_file_name(name: str) -> bool:
    return (0 < len(name.encode()) <= 200 and "/" not in name and "\\" not in name and ".." not in name
            and not name.startswith(".") and name.isprintable())


def test_row_ids_never_become_paths_in_image_structs(tiny_priors, tmp_path):
    """The cleaned tables' ``{bytes, path}`` structs (and every table written by build_table: corrupt, ingest)
    name a safe file, unique in the table, with the image's suffix; the ``id`` column keeps the raw id."""
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), len(HOSTILE_IDS), seed=1)
    from pipeline.data.shards import write_dataset

    write_dataset(str(tmp_path / "obs"), HOSTILE_IDS, {"observation": obs.observation},
                  extra={"alpha": [0.5] * len(HOSTILE_IDS)}, shard_size=5)
    for table in (pq.read_table(tmp_path / "obs"),):
        paths = [c["path"] for c in table.column("observation").to_pylist()]
        assert sorted(table.column("id").to_pylist()) == sorted(HOSTILE_IDS)
        assert all(_plain_file_name(p) and p.endswith(".png") for p in paths), paths
    from pipeline.run.local import run_local

    cfg = CleanConfig(priors={"image": tiny_priors[0], "noise": tiny_priors[1]}, sampler=SamplerConfig(steps=2),
                      batch_size=4, device="cpu", max_rejected_fraction=1.0)
    summary = run_local(str(tmp_path / "obs"), str(tmp_path / "out"), cfg, progress=False)
    cleaned = pq.read_table(Path(summary["output"].removeprefix("file://")) / "cleaned")
    assert sorted(cleaned.column("id").to_pylist()) == sorted(HOSTILE_IDS)  # raw ids, as given
    for column in ("denoised", "noise_estimate"):
        paths = [c["path"] for c in cleaned.column(column).to_pylist()]
        assert len(set(paths)) == len(paths) and all(_plain_file_name(p) and p.endswith(".png") for p in paths), paths
    by_id = dict(zip(cleaned.column("id").to_pylist(), (c["path"] for c in cleaned.column("denoised").to_pylist())))
    assert by_id["plain-1"] == "plain-1.png" and by_id["../../x.png"] == "______x.png.png"


def test_build_table_names_npy_cells_safely_and_keeps_duplicate_ids_apart():
    from pipeline.data.shards import build_table

    arrays = [np.full((1, 4, 4), 2.0, np.float32), np.zeros((1, 4, 4), np.float32)]  # .npy (out of range), .png
    t = build_table(["../a", "../b"], {"image": arrays})
    assert [c["path"] for c in t.column("image").to_pylist()] == ["___a.npy", "___b.png"]
    assert t.column("id").to_pylist() == ["../a", "../b"]


# ------------------------------------------------------------------ item 7: bounded YAML
def _bomb(levels: str = "abcdefghi") -> str:
    """The issue's alias bomb (flow style, 9 levels of 9): about 300 bytes, 72 aliases, 9**9 leaves expanded."""
    parts = ["a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for prev, cur in zip(levels, levels[1:]):
        parts.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "{" + ", ".join(parts) + "}"


def test_the_alias_bomb_is_72_aliases_under_400_bytes():
    bomb = _bomb()
    assert len(bomb) < 400 and bomb.count("*") == 72  # under the alias limit: only the expansion bound stops it


def test_an_alias_bomb_in_set_is_refused_in_bounded_memory(obs16, tmp_path):
    code = (f"from pipeline.cli import main\n"
            f"sys.exit(main(['clean', {obs16!r}, {str(tmp_path / 'out')!r}, '--quiet', "
            f"'--set', 'storage.options=' + {_bomb()!r}]))")
    proc = _capped(code)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("jointdiff: --set storage.options=...: ") and "100,000" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_an_alias_bomb_in_a_config_file_or_the_flow_overrides_is_refused(obs16, tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("storage:\n  options:\n" + "".join(f"    {line.strip()}\n" for line in
                                                        _bomb()[1:-1].split(", ")))
    assert cfg.read_text().count("*") == 72 and len(cfg.read_bytes()) < 500
    code = (f"from pipeline.cli import main\n"
            f"sys.exit(main(['clean', {obs16!r}, {str(tmp_path / 'out')!r}, '--quiet', '--config', {str(cfg)!r}]))")
    proc = _capped(code)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"jointdiff: {cfg}: ") and "100,000" in lines[0], lines[0]
    # the flow's overrides (a parameter of every deployment run)
    code = (f"from flows.clean_dataset import clean_dataset\nfrom pipeline.config import ConfigError\n"
            f"try:\n    clean_dataset.fn({obs16!r}, {str(tmp_path / 'out')!r}, "
            f"overrides=['policy=' + {_bomb()!r}])\n"
            f"except ConfigError as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(2)\n")
    proc = _capped(code)  # a key outside storage: the YAML bound refuses it, not the credential rule
    assert proc.returncode == 2 and proc.stderr.startswith("--set policy=...: ") and "100,000" in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_an_alias_bomb_in_a_runtime_env_is_refused(tmp_path):
    env = tmp_path / "runtime_env.yaml"
    env.write_text("env_vars: " + _bomb() + "\n")
    code = (f"from pathlib import Path\nfrom pipeline.config import ConfigError\n"
            f"from pipeline.jobs.submit import load_runtime_env\n"
            f"try:\n    env = load_runtime_env(Path({str(tmp_path)!r}), {str(env)!r})\n"
            f"    print(len(str(env)))\nexcept ConfigError as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(2)\n")
    proc = _capped(code)
    assert proc.returncode == 2 and proc.stderr.startswith(f"runtime env file {env}: "), proc.stderr[-3000:]


def _load(tmp_path: Path, text: str, *overrides: str) -> CleanConfig:
    from pipeline.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(CleanConfig, path, list(overrides))


def test_yaml_over_the_limits_is_refused_in_one_line(tmp_path):
    aliases = lambda n: "x: &x 1\nys: [" + ", ".join(["*x"] * n) + "]\n"  # noqa: E731
    nested = lambda n: "x: " + "[" * n + "]" * n + "\n"  # noqa: E731
    cases = [("# padding\n" * 120_000, "more than 1 MiB"),
             (aliases(101), "more than 100 aliases"),
             (nested(33), "more than 32 levels"),
             (nested(100_000), "more than 32 levels"),
             ("x: &x [1, *x]\n", "refers to itself"),
             ("x: [" + ", ".join(["1"] * 100_001) + "]\n", "100,000")]
    for text, expected in cases:
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, text)
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path / 'c.yaml'}: ") and expected in msg and "\n" not in msg, msg[:300]
    # at the limits (the top-level mapping is one level): read, then refused by the model for its unknown key
    for text in (aliases(100), nested(31)):
        with pytest.raises(ConfigError, match="unknown key"):
            _load(tmp_path, text)
    for value, expected in (("[" * 40 + "]" * 40, "more than 32 levels"), ("[" * 100_000, "more than 32 levels")):
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, "{}\n", f"sampler.steps={value}")
        assert str(err.value).startswith("--set sampler.steps=...: ") and expected in str(err.value)


def test_storage_options_are_plain_values_two_levels_deep(tmp_path):
    ok = _load(tmp_path, "storage:\n  options:\n    use_ssl: false\n    default_block_size: 5242880\n"
                         "    client_kwargs: {region_name: eu-west-1}\n"
                         "    config_kwargs: {s3: {addressing_style: path}, retries: {max_attempts: 5}}\n")
    assert ok.storage.options["config_kwargs"]["s3"] == {"addressing_style": "path"}
    bad = [("{a: [1, 2]}", "storage.options.a"),
           ("{config_kwargs: {s3: {deeper: {x: 1}}}}", "storage.options.config_kwargs.s3.deeper"),
           ("{" + ", ".join(f"k{i}: {i}" for i in range(65)) + "}", "64"),
           ("{a: " + "x" * 5000 + "}", "storage.options.a"),
           ("{a: !!binary aGVsbG8=}", "storage.options.a")]
    for value, expected in bad:
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, "{}\n", f"storage.options={value}")
        msg = str(err.value)
        head = f"{tmp_path / 'c.yaml'}: invalid config: storage.options (set by --set): "
        assert msg.startswith(head) and expected in msg, msg[:300]
        assert "x" * 100 not in msg  # a value is never repeated


def test_every_yaml_read_goes_through_the_bounded_loader():
    """No module reads YAML but the bounded loader (a new yaml.safe_load would bypass the limits)."""
    offenders = []
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        text = path.read_text()
        for call in ("yaml.safe_load(", "yaml.load(", "yaml.full_load(", "yaml.unsafe_load(", "yaml.safe_load_all("):
            if call in text and path.name != "untrusted.py":
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
    assert offenders == []


# ------------------------------------------------------------------ item 8: checkpoint configs
def _nest(n: int) -> str:
    return "[" * n + "]" * n


PROBES = {
    "base_channels 10**12": (lambda c: c["unet"].update(base_channels=10**12), None, "unet.base_channels"),
    "a string beta_max": (lambda c: c["sde"].update(beta_max="20"), None, "sde.beta_max"),
    "100,000-deep nesting": (None, lambda t: t.replace('"meta": {', '"meta": {"deep": ' + _nest(100_000) + ", ", 1),
                             "meta.deep"),
    "negative beta_min, eps 0": (lambda c: c["sde"].update(beta_min=-0.1, eps=0), None, "sde.beta_min"),
    "NaN time_scale": (lambda c: c["unet"].update(time_scale=math.nan), None, "unet.time_scale"),
    "eps 0": (lambda c: c["sde"].update(eps=0.0), None, "sde.eps"),
    "beta_max below beta_min": (lambda c: c["sde"].update(beta_max=0.05), None, "sde.beta_max"),
    "infinite dropout": (lambda c: c["unet"].update(dropout=math.inf), None, "unet.dropout"),
    "a 2 MiB config": (lambda c: c["meta"].update(pad="x" * 2 * 1024**2), None, "1 MiB"),
    "channel_mults of text": (lambda c: c["unet"].update(channel_mults="abc"), None, "unet.channel_mults"),
    "a list for unet": (lambda c: c.update(unet=[1, 2]), None, "unet"),
}


def _prior_copies(tiny_priors, dest: Path, probe: str) -> tuple[Path, Path]:
    """Both tiny priors copied under ``dest``, each ``config.json`` edited by ``probe`` (both: so that the two
    SDEs still match, as they would for priors trained together)."""
    edit, text_edit, _ = PROBES[probe]
    configs = []
    for src, name in zip(tiny_priors, ("img", "noise")):
        shutil.copytree(src, dest / name)
        path = dest / name / "config.json"
        cfg = json.loads(path.read_text())
        if edit is not None:
            edit(cfg)
        text = json.dumps(cfg)  # NaN and Infinity as JSON's extensions write them
        path.write_text(text_edit(text) if text_edit is not None else text)
        configs.append(path)
    return configs[0], configs[1]


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_hostile_prior_config_is_one_line_before_any_network_is_built(probe, obs16, tiny_priors, tmp_path, capsys):
    image, noise = _prior_copies(tiny_priors, tmp_path / "priors", probe)
    key = PROBES[probe][2]
    out = tmp_path / "out"
    rc = main(["clean", obs16, str(out), "--quiet", *_tiny_sets(tiny_priors), "--set",
               f"priors.image={image.parent}", "--set", f"priors.noise={noise.parent}"])
    line = _one_line(capsys, rc)
    assert rc == 2 and line.startswith(f"jointdiff: priors.image: {image}: ") and key in line, line
    assert len(line) < 400 and "x" * 100 not in line
    assert not out.exists()
    rc = main(["sample", str(noise.parent), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png"), "--quiet"])
    line = _one_line(capsys, rc)
    assert rc == 2 and line.startswith(f"jointdiff: {noise}: ") and key in line, line
    assert not (tmp_path / "s.png").exists()


def test_priors_with_different_sdes_are_refused_before_the_work(obs16, tiny_priors, tmp_path, capsys):
    shutil.copytree(tiny_priors[1], tmp_path / "prior")
    path = tmp_path / "prior" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["sde"]["beta_max"] = 15.0
    path.write_text(json.dumps(cfg))
    rc = main(["clean", obs16, str(tmp_path / "out"), "--quiet", *_tiny_sets(tiny_priors), "--set",
               f"priors.noise={tmp_path / 'prior'}"])
    line = _one_line(capsys, rc)
    assert rc == 2 and "different SDEs" in line and "sde.beta_max" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("probe,key", [("step", "step"), ("losses", "losses"), ("deep", "losses")])
def test_a_hostile_training_state_is_one_line_when_resuming(probe, key, tiny_priors, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_priors[0]).parent, run)  # the img prior's training folder: state/ and model/
    state = next((run / "state").glob("step-*")) / "state.json"
    meta = json.loads(state.read_text())
    if probe == "step":
        meta["step"] = "two"
        state.write_text(json.dumps(meta))
    elif probe == "losses":
        meta["losses"] = [0.1, "x"]
        state.write_text(json.dumps(meta))
    else:
        state.write_text(json.dumps(meta).replace('"losses": [', '"losses": [' + _nest(100_000) + ", ", 1))
    cfg = tiny_config(str(run), steps=4, checkpoint_every=2).model_copy(update={"name": "img"})
    config = tmp_path / "prior.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rc = main(["train", "--config", str(config), "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 2 and lines[0].startswith("training prior 'img'"), err
    assert rc == 2 and lines[1].startswith(f"jointdiff: {state}: {key}"), lines[1]
