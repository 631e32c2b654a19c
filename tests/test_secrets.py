"""Credentials stay out of what jointdiff's orchestrators store and show (issue 17, items 5 and 6).

Prefect stores a flow run's parameters in plain text before the flow's body, or even its parameter
validation, runs; a submitted Ray job's arguments are its entry point, and its runtime env is shown next to
it (``jointdiff submit list``/``status``, the Ray dashboard). So no override may set anything under
``storage`` but ``endpoint_url``, ``region`` and ``anon``, in any spelling, and a job's runtime env may hold no
credential. These tests run the real CLIs, a real Prefect server (the session's test harness) and Ray's own
packaging code. Each refusal must come before anything is stored or any connection is made, in one line
that never holds the value.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

SECRET = f"s3cr3t-{secrets.token_hex(8)}"

# Every spelling of a storage credential that an override can take (ids: what each one tries)
REFUSED = {
    "dotted-secret": f"storage.secret={SECRET}",
    "dotted-key": f"storage.key={SECRET}",
    "dotted-token": f"storage.token={SECRET}",
    "storage-mapping": f"storage={{secret: {SECRET}}}",
    "mapping-beside-allowed": f"storage={{anon: false, token: {SECRET}}}",
    "options-mapping": f"storage.options={{secret: {SECRET}}}",
    "options-dotted": f"storage.options.secret={SECRET}",
    "options-nested": f"storage.options.client_kwargs={{aws_secret_access_key: {SECRET}}}",
    "case-and-spaces": f" Storage.Secret = {SECRET}",
    "allowed-key-holding-a-mapping": f"storage.region={{x: {SECRET}}}",
    "allowed-key-holding-a-list": f"storage.region=[{SECRET}]",
    "password-in-endpoint": f"storage.endpoint_url=http://AKIAEXAMPLE:{SECRET}@minio:9000",
    "colon-for-equals": f"storage.secret:{SECRET}",
    "storage-colon": f"storage:{SECRET}",
}
# What an override may still say about storage, and overrides that only mention the word
ALLOWED = ["storage.endpoint_url=http://minio.internal:9000", "storage.region=eu-west-1", "storage.anon=true",
           "storage.region = eu-west-1", "sampler.steps=2", "priors.image=s3://team-storage/models/faces",
           "storage_note=1"]


def _stored_parameters() -> str:
    """Every flow run's parameters on the Prefect server, as one JSON text."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return json.dumps([r.parameters for r in client.read_flow_runs()], default=str)


def _run_ids() -> set:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {r.id for r in client.read_flow_runs()}


# ---------------------------------------------------------------------------------------------------
# 5. Flow parameters

def test_only_endpoint_region_and_anon_may_be_set_under_storage_by_an_override():
    from pipeline.config import ConfigError, credential_overrides, refuse_credentials

    for pair in REFUSED.values():
        assert credential_overrides([pair]), pair
        with pytest.raises(ConfigError) as exc:
            refuse_credentials(["sampler.steps=2", pair])
        assert SECRET not in str(exc.value) and "\n" not in str(exc.value)
        assert "storage.endpoint_url, storage.region and storage.anon" in str(exc.value)
    assert credential_overrides(ALLOWED + ["storage={anon: true, region: eu-west-1}"]) == []
    refuse_credentials(ALLOWED)
    # each refusal names the key as it was typed, never the value (nor a key found inside the value)
    assert credential_overrides([f"storage.options={{{SECRET}: 1}}", "storage.key=AKIA",
                                 f"storage.secret:{SECRET}"]) == ["storage.options", "storage.key", "storage"]


def test_the_deployment_schema_refuses_every_spelling_the_check_refuses():
    """Prefect's server checks a deployment run's parameters against this JSON schema, as it does
    (prefect.utilities.schema_tools.validate, raising its best-matching error); the schema is the stricter of
    the two checks."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.clean_dataset import clean_dataset
    from flows.learn_prior import learn_prior
    from flows.train_priors import train_priors

    bases = {clean_dataset: {"input_uri": "s3://b/in", "output": "s3://b/out"},
             train_priors: {"image_config": "a.yaml", "noise_config": "b.yaml", "registry": "s3://m"},
             learn_prior: {"input_uri": "s3://b/in", "output": "s3://b/out", "noise_prior": "stripes"}}
    for flow, base in bases.items():
        schema = parameter_schema(flow).model_dump()
        keys = ["overrides", "prior_overrides"] if flow is learn_prior else ["overrides"]
        for key in keys:
            for pair in REFUSED.values():
                with pytest.raises(ValidationError) as exc:
                    validate({**base, key: ["sampler.steps=2", pair]}, schema, raise_on_error=True)
                assert SECRET not in str(exc.value), str(exc.value)
            dotted = [p for p in ALLOWED if not p.startswith("storage") or p.startswith("storage.")]
            assert validate({**base, key: dotted}, schema) == []
            assert validate({**base, key: None}, schema) == []


@pytest.mark.parametrize("pair", REFUSED.values(), ids=REFUSED.keys())
def test_the_flow_cli_refuses_storage_credentials_before_a_flow_run_exists(prefect_harness, pair, tmp_path, capsys):
    from flows.clean_dataset import main

    before = _run_ids()
    rc = main([str(tmp_path / "obs"), str(tmp_path / "out"), "--set", "sampler.steps=2", "--set", pair, "--quiet"])
    out = capsys.readouterr()
    assert SECRET not in _stored_parameters()
    assert _run_ids() == before  # no flow run was created
    assert rc == 2
    assert SECRET not in out.out + out.err
    assert out.err.count("\n") == 1 and "may be set by an override" in out.err, out.err


def test_calling_the_flows_from_python_refuses_before_a_run_exists(prefect_harness, tmp_path):
    from flows.clean_dataset import clean_dataset
    from flows.train_priors import train_priors
    from pipeline.config import ConfigError

    before = _run_ids()
    with pytest.raises(ConfigError, match=r"--set storage=\.\.\.: only storage.endpoint_url"):
        clean_dataset(str(tmp_path / "obs"), str(tmp_path / "out"), overrides=[REFUSED["storage-mapping"]])
    with pytest.raises(ConfigError, match=r"--set storage.options=\.\.\."):
        train_priors("configs/prior_faces.yaml", "configs/prior_digits.yaml", str(tmp_path / "reg"),
                     overrides=[REFUSED["options-mapping"]])
    from flows.learn_prior import learn_prior

    with pytest.raises(ConfigError, match=r"--prior-set storage.options=\.\.\."):
        learn_prior(str(tmp_path / "obs"), str(tmp_path / "out"), "stripes",
                    prior_overrides=[REFUSED["options-mapping"]])
    assert _run_ids() == before and SECRET not in _stored_parameters()


def test_the_demo_refuses_storage_credentials_before_its_flow_runs(prefect_harness, tmp_path, capsys):
    from pipeline.cli import main

    before = _run_ids()
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--n", "4", "--shard-size", "4", "--steps", "2", "--quiet",
               "--set", REFUSED["options-dotted"]])
    out = capsys.readouterr()
    assert rc == 2, out.err
    assert SECRET not in out.out + out.err and "storage.options.secret=..." in out.err
    assert _run_ids() == before and SECRET not in _stored_parameters()


def test_a_deployment_run_with_storage_credentials_is_refused_by_the_prefect_server(prefect_harness, tmp_path):
    """Both flows deployed (as `prefect deploy` does: the schema of the flow's signature, enforced by default);
    the server refuses such a run and stores nothing, and names no value; a run without them is created."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.clean_dataset import clean_dataset
    from flows.train_priors import train_priors

    params = {clean_dataset: {"input_uri": "s3://b/in", "output": "s3://b/out"},
              train_priors: {"image_config": "a.yaml", "noise_config": "b.yaml", "registry": "s3://m"}}
    for flow, base in params.items():
        # a deployment whose default parameters hold one is refused too (422; Prefect's reply repeats its input)
        with pytest.raises(Exception, match="422"):
            flow.to_deployment(name="secrets-defaults", parameters={**base, "overrides": [REFUSED["dotted-secret"]]}
                               ).apply()
        deployment_id = flow.to_deployment(name="secrets-test").apply()
        with get_client(sync_client=True) as client:
            assert client.read_deployment(deployment_id).enforce_parameter_schema
        for pair in REFUSED.values():
            with pytest.raises(Exception) as exc:
                run_deployment(f"{flow.name}/secrets-test", parameters={**base, "overrides": [pair]}, timeout=0)
            assert "409" in str(exc.value) and SECRET not in str(exc.value), str(exc.value)
        run = run_deployment(f"{flow.name}/secrets-test", timeout=0,
                             parameters={**base, "overrides": ["storage.region=eu-west-1"]})
        assert run.parameters["overrides"] == ["storage.region=eu-west-1"]
        with get_client(sync_client=True) as client:
            client.delete_flow_run(run.id)  # no worker will ever take it
            client.delete_deployment(deployment_id)
    assert SECRET not in _stored_parameters()
    with get_client(sync_client=True) as client:
        assert SECRET not in json.dumps([d.parameters for d in client.read_deployments()])


# ---------------------------------------------------------------------------------------------------
# 6. `jointdiff submit`: the job's arguments, its runtime env, the files it ships

@pytest.fixture
def jobs_api():
    """``(address, connections)``: a TCP port on 127.0.0.1 that accepts and closes every connection, counting
    them. A refused submission must never reach for the cluster."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    connections, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connections.append(1)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("pair", REFUSED.values(), ids=REFUSED.keys())
def test_submit_refuses_storage_credentials_in_the_job_arguments_before_connecting(pair, jobs_api, tmp_path,
                                                                                   monkeypatch, capsys):
    from pipeline.cli import main

    address, connections = jobs_api
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("name: p\ndata: {source: digits}\noutput: s3://m/p\n")
    for argv in (["submit", "clean", "in", "out", "--set", pair],
                 ["submit", "clean", "in", "out", f"--set={pair}", "--quiet"],
                 ["submit", "train", "--config", "c.yaml", "--set", pair]):
        rc = main([*argv, "--address", address])
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err
        assert connections == [], out.err
        assert rc == 2 and out.err.count("\n") == 1 and "may be set by an override" in out.err, out.err
    # arguments that the job's parser refuses are not repeated either
    assert main(["submit", "clean", "in", "out", "--set", pair, "--no-such-flag", "--address", address]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "refused by its parser" in out.err and connections == []


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                                  "RAY_AUTH_TOKEN", "GITHUB_TOKEN", "DB_PASSWORD", "minio_secret",
                                  "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "FSSPEC_S3_KEY"])
def test_submit_refuses_credentials_in_the_runtime_env_before_connecting(name, jobs_api, tmp_path, monkeypatch,
                                                                         capsys):
    from pipeline.cli import main

    address, connections = jobs_api
    monkeypatch.chdir(tmp_path)
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", name: SECRET}}
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "runtime_env.yaml").write_text(yaml.safe_dump(env))  # the default file
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(env))                     # and --runtime-env
    for extra, file in (([], "deploy/runtime_env.yaml"), (["--runtime-env", "other.yaml"], "other.yaml")):
        rc = main(["submit", "clean", "in", "out", *extra, "--address", address])
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err
        assert connections == [], out.err
        assert rc == 2 and out.err.count("\n") == 1, out.err
        assert f"{file}: env_vars {name} may not be shipped" in out.err, out.err


def test_a_runtime_env_without_credentials_still_goes_to_the_cluster(jobs_api, tmp_path, monkeypatch, capsys):
    """The check refuses names, not every variable: a region, a token *file* on the nodes (IRSA) pass."""
    from pipeline.cli import main

    address, connections = jobs_api
    monkeypatch.chdir(tmp_path)
    (tmp_path / "env.yaml").write_text(yaml.safe_dump({"env_vars": {
        "AWS_REGION": "eu-west-1", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token", "RAY_AUTH_MODE": "token"}}))
    assert main(["submit", "clean", "in", "out", "--runtime-env", "env.yaml", "--address", address]) == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err  # it got as far as the cluster
    assert connections


SECRET_FILES = [".env", ".env.local", "certs/server.pem", "certs/server.key", "id_rsa", "id_ed25519.pub",
                ".aws/credentials", ".aws/config", "sub/.netrc", "keys/client.p12", "credentials",
                ".ssh/known_hosts", ".git-credentials", "gcp/credentials.json"]
KEPT_FILES = ["configs/clean.yaml", "data/readme.txt", "environment.yml", "monkey.txt", "notes.md"]


def _working_dir(root: Path) -> Path:
    wd = root / "wd"
    for name in SECRET_FILES + KEPT_FILES + ["runs/old/big.bin", "runs/old/x.pem"]:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text(SECRET if name in SECRET_FILES else "ok\n")
    (wd / "deploy").mkdir()
    (wd / "deploy" / "runtime_env.yaml").write_text(yaml.safe_dump({"excludes": ["runs"],
                                                                    "env_vars": {"PYTHONUNBUFFERED": "1"}}))
    return wd


def test_submit_never_ships_secret_files_and_says_in_one_line_what_it_left_out(jobs_api, tmp_path, monkeypatch,
                                                                               capsys):
    """The runtime env `submit` sends, packed by Ray's own packaging code (what it uploads for working_dir):
    no key, certificate, credential file or .env in it; the runtime env file's own excludes kept."""
    from ray._private.runtime_env.packaging import create_package

    from pipeline.cli import main
    from pipeline.jobs import submit as sj

    address, _ = jobs_api
    wd = _working_dir(tmp_path)
    monkeypatch.chdir(wd)
    lines: list[str] = []
    env = sj.job_runtime_env(wd, None, log=lines.append)
    assert env["excludes"][0] == "runs" and {".env", "*.pem", ".aws/", "id_rsa*"} <= set(env["excludes"])
    create_package(str(wd), tmp_path / "wd.zip", include_gitignore=True, excludes=env["excludes"])
    shipped = set(zipfile.ZipFile(tmp_path / "wd.zip").namelist())
    assert shipped == {*KEPT_FILES, "deploy/runtime_env.yaml"}, shipped
    # one line, naming exactly what was left out for being a secret (runs/ was excluded by the file already)
    assert len(lines) == 1, lines
    named = lines[0].split(": ", 1)[1].split(", ")
    assert sorted(named) == sorted([".aws/", ".env", ".env.local", ".git-credentials", ".ssh/", "certs/server.key",
                                    "certs/server.pem", "credentials", "gcp/credentials.json", "id_ed25519.pub",
                                    "id_rsa", "keys/client.p12", "sub/.netrc"]), lines
    # and `jointdiff submit` prints that line (before it reaches for the cluster)
    assert main(["submit", "clean", "in", "out", "--address", address]) == 2
    err = capsys.readouterr().err.splitlines()
    assert lines[0] in err and "cannot reach the Ray Jobs API" in err[-1]
    # nothing to leave out, nothing said
    clean = tmp_path / "clean"
    (clean / "configs").mkdir(parents=True)
    (clean / "configs" / "c.yaml").write_text("sampler: {steps: 2}\n")
    lines.clear()
    assert ".env" in sj.job_runtime_env(clean, None, log=lines.append)["excludes"] and lines == []


def test_the_clusters_own_identity_may_be_named_in_the_runtime_env():
    from pipeline.jobs.submit import check_env_vars

    check_env_vars({"env_vars": {"GOOGLE_APPLICATION_CREDENTIALS": "/var/run/secrets/gcp/key.json",
                                 "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
                                 "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks/token",
                                 "AWS_REGION": "eu-west-1"}}, "deploy/runtime_env.yaml")


@pytest.mark.parametrize("storage", [{"secret": SECRET}, {"key": "AKIA", "token": SECRET},
                                     {"options": {"client_kwargs": {"aws_secret_access_key": SECRET}}}])
@pytest.mark.parametrize("recipe", [False, True])
def test_submit_refuses_a_config_file_that_holds_credentials(storage, recipe, jobs_api, tmp_path, monkeypatch,
                                                             capsys):
    from pipeline.cli import main

    address, connections = jobs_api
    monkeypatch.chdir(tmp_path)
    doc = {"sampler": {"steps": 10}, "storage": {"region": "eu-west-1", **storage}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"clean": doc} if recipe else doc))
    assert main(["submit", "clean", "in", "out", "--config", "c.yaml", "--address", address]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and connections == [] and out.err.count("\n") == 1, out.err
    assert "--config c.yaml: storage." in out.err and "would travel to the cluster" in out.err, out.err


def test_a_flow_copied_with_options_still_refuses_before_a_run_exists(prefect_harness):
    from flows.clean_dataset import clean_dataset
    from pipeline.config import ConfigError

    before = _run_ids()
    copy = clean_dataset.with_options(name="clean-dataset-copy")
    with pytest.raises(ConfigError):
        copy("in", "out", overrides=[f"storage.secret={SECRET}"])
    assert _run_ids() == before and SECRET not in _stored_parameters()
