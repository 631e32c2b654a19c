"""A user's mistake in a model name, a config key, a --set value or the device: one line, exit 2, before
any work (issue 16, item 9)."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded


@pytest.fixture
def obs(tmp_path) -> str:
    uri = str(tmp_path / "obs")
    write_observations(uri, corrupt(load_embedded("faces", "test", 32), load_embedded("digits", "test", 32), 2,
                                    seed=0), shard_size=2)
    return uri


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return rc, lines[0]


def test_unknown_model_lists_the_shipped_priors_and_the_accepted_forms(obs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, line = _run(capsys, "clean", obs, str(out), "--set", "priors.image=face", "--quiet")
    assert rc == 2
    assert line == ("jointdiff: priors.image: unknown model 'face': not a shipped prior (faces, digits, stripes, "
                    "natural, stripes-rgb, text), and "
                    "face does not exist. A model is a shipped name, a folder or URI holding config.json + "
                    "weights.safetensors (jointdiff train writes OUTPUT/model), or a registry's "
                    "ROOT/models/NAME/latest")
    assert not out.exists()  # refused before the run began
    (tmp_path / "empty").mkdir()
    rc, line = _run(capsys, "sample", str(tmp_path / "empty"), "--n", "1", "--quiet")
    assert rc == 1 and "is a folder without config.json" in line
    assert "faces, digits, stripes, natural, stripes-rgb, text" in line


def test_a_config_typo_suggests_the_key_and_names_the_file_or_the_override(obs, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, line = _run(capsys, "clean", obs, out, "--set", "sampler.setps=3", "--quiet")
    assert (rc, line) == (2, "jointdiff: invalid config: --set sampler.setps=...: unknown key; did you mean "
                             "sampler.steps?")
    cfg = tmp_path / "clean.yaml"
    cfg.write_text("sampler:\n  setps: 3\n")
    rc, line = _run(capsys, "clean", obs, out, "--config", str(cfg), "--quiet")
    assert (rc, line) == (2, f"jointdiff: {cfg}: invalid config: sampler.setps: unknown key; did you mean "
                             "sampler.steps?")
    # no close key: the section's keys instead; a value never repeated (it could be a secret)
    rc, line = _run(capsys, "clean", obs, out, "--set", "storage.password=hunter2", "--quiet")
    assert rc == 2 and line.startswith("jointdiff: invalid config: --set storage.password=...: unknown key; "
                                       "storage has endpoint_url, region, key, secret")
    assert "hunter2" not in line


def test_set_with_a_yaml_syntax_error_is_one_line(obs, tmp_path, capsys):
    rc, line = _run(capsys, "clean", obs, str(tmp_path / "out"), "--set", "sampler.steps=[1,", "--quiet")
    assert rc == 2
    assert line.startswith("jointdiff: --set sampler.steps=...: the value is not valid YAML (")
    assert line.endswith("quote it to pass it as text, e.g. --set 'sampler.steps=\"...\"'")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_gpu_this_machine_lacks_is_one_line_before_the_work(obs, tmp_path, capsys, monkeypatch, executor):
    """cuda:7 exists on no machine that runs these tests; the ray executor checks it here because no cluster is
    named (its actors would run on this machine)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    rc, line = _run(capsys, "clean", obs, str(out), "--executor", executor, "--set", "device=cuda:7", "--quiet")
    assert rc == 2
    assert line.startswith("jointdiff: device=cuda:7: ") and "--set device=cpu" in line, line
    assert not out.exists()
    rc, line = _run(capsys, "clean", obs, str(out), "--executor", executor, "--set", "device=gpu", "--quiet")
    assert (rc, line) == (2, "jointdiff: device='gpu' is not a device; use --set device=cpu, cuda, cuda:N or auto")
