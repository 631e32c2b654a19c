"""Going to a cluster: the files in deploy/, ``jointdiff submit`` against a real token-authenticated Ray
head, and the Prefect deployments registered and run against the test harness's server."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import CleanConfig, ConfigError, PriorConfig, load_config
from pipeline.jobs import submit as sj

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CRDS = REPO / "tests" / "data" / "kuberay-crds"  # copied from ../shared/kuberay-crds (see its README)
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
PINS = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().split()
            if "==" in line and not line.startswith("#"))
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGE = f"ghcr.io/jointdiff/jointdiff:{VERSION}-ray{PINS['ray']}-py311-gpu"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _workdir_in_image() -> str:
    return re.search(r"^WORKDIR (\S+)", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M).group(1)


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests against the real ray.io/v1 CRD schemas

@functools.cache
def _crds() -> dict[str, dict]:
    """The CRDs by kind, parsed once per session (each is 1-1.4 MB of YAML: seconds per parse in pure Python)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crds = [yaml.load(f.read_text(), Loader=loader) for f in sorted(CRDS.glob("ray.io_*.yaml"))]
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def _crd_schema(kind: str) -> dict:
    """The v1 schema of ``kind`` (shared between callers: read it, never change it)."""
    crd = _crds().get(kind)
    if crd is None:
        raise AssertionError(f"no CRD for {kind} in {CRDS}")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason=f"no {SHARED_CRDS} beside this checkout to compare with")
def test_the_copied_crds_are_the_shared_ones():
    for f in SHARED_CRDS.iterdir():
        assert (CRDS / f.name).read_bytes() == f.read_bytes(), f.name


def _unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (what `kubectl apply --validate=strict` rejects and an API server
    silently prunes), which JSON Schema alone lets through."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if props is not None and key in props:
                found += _unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += _unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                found.append(f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            found += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def _check_manifest(doc: dict) -> list[str]:
    schema = _crd_schema(doc["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + [f"{f}: unknown field" for f in _unknown_fields(doc, schema)]


KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def test_the_kuberay_manifests_are_a_raycluster_and_a_rayjob_per_prior_and_for_cleaning():
    kinds = {p.name: _yaml(p)["kind"] for p in KUBERAY}
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob-clean.yaml": "RayJob",
                     "rayjob-train-digits.yaml": "RayJob", "rayjob-train-faces.yaml": "RayJob"}
    cluster = _yaml(DEPLOY / "kuberay" / "raycluster.yaml")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["authOptions"] == {"mode": "token"}
    (gpu,) = cluster["workerGroupSpecs"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd_schema(path):
    doc = _yaml(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert _check_manifest(doc) == []


def test_the_crd_check_catches_typos_and_wrong_types():
    doc = _yaml(DEPLOY / "kuberay" / "raycluster.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["enableInTreeAutoscalling"] = bad["spec"].pop("enableInTreeAutoscaling")  # would be pruned
    assert _check_manifest(bad) == [".spec.enableInTreeAutoscalling: unknown field"]
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = bad["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert sorted(_check_manifest(bad)) == [".spec.workerGroupSpecs[0].maxReplica: unknown field",
                                            "spec.workerGroupSpecs.0: 'maxReplicas' is a required property"]
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e and "integer" in e for e in _check_manifest(bad))
    bad = copy.deepcopy(doc)
    bad["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions.mode" in e for e in _check_manifest(bad))


# ---------------------------------------------------------------------------------------------------
# Ray's cluster launcher and Prefect's deployment file, with their own validators

def test_the_cluster_launcher_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml(DEPLOY / "aws" / "cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["docker"]["image"] == IMAGE
    gpu = config["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["max_workers"] == 8
    assert all("RAY_AUTH_MODE=token ray start" in c for c in config["head_start_ray_commands"][1:]
               + config["worker_start_ray_commands"][1:])
    bad = copy.deepcopy(config)
    bad["max_worker"] = bad.pop("max_workers")  # a typo is refused
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_prefect_yaml_validates_and_its_entrypoints_take_its_parameters():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = _yaml(DEPLOY / "prefect.yaml")
    model = PrefectYamlModel.model_validate(raw)
    assert model.prefect_version == PINS["prefect"] and raw["pull"] == []
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {"nightly", "manual"}
    nightly = by_name["nightly"]
    assert [s.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.concurrency_limit == 1
    assert not by_name["manual"].schedules
    for d in model.deployments:
        flow = load_flow_from_entrypoint(d.entrypoint, use_placeholder_flow=False)
        params = inspect.signature(flow.fn).parameters
        assert set(d.parameters) <= set(params), (d.name, set(d.parameters) - set(params))
        flow.validate_parameters(d.parameters)  # types, as Prefect checks them when a run is created
        assert d.work_pool.name == "jointdiff"
        assert d.work_pool.job_variables["working_dir"] == _workdir_in_image()
    p = nightly.parameters
    assert nightly.entrypoint == "flows.clean_dataset.clean_dataset"
    load_config(CleanConfig, str(REPO / p["config"]), p["overrides"])  # the config and overrides are valid
    m = by_name["manual"].parameters
    for key in ("image_config", "noise_config"):
        load_config(PriorConfig, str(REPO / m[key]), m.get("overrides") or [])


# ---------------------------------------------------------------------------------------------------
# Entry points, images, versions and runtime envs agree with the code and the pins

def _rayjob_command(path: Path) -> tuple[str, list[str]]:
    argv = shlex.split(_yaml(path)["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    (kind,) = [k for k, module in sj.ENTRYPOINTS.items() if module == argv[2]]
    return kind, argv[3:]


@pytest.mark.parametrize("path", [p for p in KUBERAY if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_rayjob_entrypoints_exist_and_accept_their_flags(path):
    import importlib

    from pipeline.cli import build_parser

    kind, args = _rayjob_command(path)
    importlib.import_module(sj.ENTRYPOINTS[kind])
    ns = build_parser().parse_args([kind, *args])  # argparse exits on a flag it does not know
    assert (REPO / ns.config).is_file()
    if kind == "clean":
        cfg = load_config(CleanConfig, str(REPO / ns.config), ns.set)
        assert cfg.ray.autoscaling and cfg.ray.gpus_per_actor == 1  # the cluster starts without GPU workers
        assert ns.input.startswith("s3://") and ns.output.startswith("s3://")
    else:
        cfg = load_config(PriorConfig, str(REPO / ns.config), ns.set)
        assert ns.gpu and ns.workers == _yaml(path)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
        assert cfg.output.startswith("s3://") and ns.registry.startswith("s3://")
        assert path.name == f"rayjob-train-{cfg.name}.yaml"


def _images(doc) -> list[str]:
    if isinstance(doc, dict):
        return [v for k, v in doc.items() if k == "image" and isinstance(v, str)] + \
            [i for v in doc.values() for i in _images(v)]
    if isinstance(doc, list):
        return [i for v in doc for i in _images(v)]
    return []


def test_images_and_ray_versions_agree_with_the_pins():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1) == PINS["ray"]
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", dockerfile, re.M)
    assert IMAGE in dockerfile  # the build command in its header
    assert "-c constraints.txt" in dockerfile
    for line in re.findall(r"^COPY .*$", dockerfile, re.M):
        for src in line.split()[2:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    for path in KUBERAY:
        doc = _yaml(path)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == PINS["ray"], path.name
        assert set(_images(doc)) == {IMAGE}, path.name
    assert _yaml(DEPLOY / "aws" / "cluster.yaml")["docker"]["image"] == IMAGE


def test_the_runtime_env_is_the_same_in_every_copy():
    env = _yaml(DEPLOY / "runtime_env.yaml")
    assert env["working_dir"] == "."
    for path in KUBERAY:
        doc = _yaml(path)
        if doc["kind"] == "RayJob":
            assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) == {**env, "working_dir": _workdir_in_image()}
    for d in _yaml(DEPLOY / "prefect.yaml")["deployments"]:
        assert env["env_vars"].items() <= d["work_pool"]["job_variables"]["env"].items()
    shipped = sj.load_runtime_env(REPO)  # what `jointdiff submit` sends from a checkout: the package travels too
    assert shipped == {**env, "working_dir": str(REPO), "py_modules": [str(REPO / "pipeline")]}


# ---------------------------------------------------------------------------------------------------
# jointdiff submit: what it checks before anything reaches a cluster

def test_job_command_checks_the_arguments_and_ships_the_config_relative_to_the_working_dir(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("sampler: {steps: 2}\n")
    monkeypatch.chdir(tmp_path)
    argv = sj.job_command("clean", ["--set", "in=1", "in", "out", "--config", str(tmp_path / "cfg" / "c.yaml"),
                                    "--quiet", "--set", "x=1"], tmp_path)
    # local INPUT and OUTPUT become absolute file:// URIs; an option's value that looks like them does not
    assert argv == ["python3", "-m", "pipeline.jobs.entry", "clean", "--set", "in=1", f"file://{tmp_path}/in",
                    f"file://{tmp_path}/out", "--config", "cfg/c.yaml", "--quiet", "--set", "x=1"]
    assert sj.job_command("clean", ["s3://b/in", "memory://out"], tmp_path)[4:] == ["s3://b/in", "memory://out"]
    monkeypatch.chdir(tmp_path / "cfg")  # a relative --config is taken from the current directory
    assert sj.job_command("train", ["--config=c.yaml", "--gpu"], tmp_path) == \
        ["python3", "-m", "pipeline.jobs.entry", "train", "--config=cfg/c.yaml", "--gpu"]
    with pytest.raises(ConfigError, match="outside the working directory"):
        sj.job_command("clean", ["in", "out", "--config", str(REPO / "configs" / "denoise.yaml")], tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        sj.job_command("clean", ["in", "out", "--config", str(tmp_path / "nope.yaml")], tmp_path)
    with pytest.raises(ConfigError, match="--ray-address is set by the cluster"):
        sj.job_command("clean", ["in", "out", "--ray-address", "ray://h:10001"], tmp_path)
    with pytest.raises(ConfigError, match="refused by its parser"):
        sj.job_command("clean", ["in", "out", "--stepz", "3"], tmp_path)


def test_address_is_the_jobs_api_not_a_cluster_address(monkeypatch):
    monkeypatch.delenv(sj.ADDRESS_ENV, raising=False)
    with pytest.raises(ConfigError, match="no Ray Jobs API address"):
        sj.jobs_address(None)
    for wrong in ("ray://head:10001", "head:6379"):
        with pytest.raises(ConfigError, match="not a Ray Jobs API address.*--ray-address"):
            sj.jobs_address(wrong)
    assert sj.jobs_address("http://head:8265/") == "http://head:8265"
    monkeypatch.setenv(sj.ADDRESS_ENV, "https://ray.example.org")
    assert sj.jobs_address(None) == "https://ray.example.org"


def test_the_token_is_read_from_the_environment_then_the_token_path_then_the_home_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert sj.read_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert sj.read_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert sj.read_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sj.read_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot be read"):
        sj.read_token()


# ---------------------------------------------------------------------------------------------------
# A real Ray head with token authentication, on 127.0.0.1

@pytest.fixture
def ray_head(ray_cluster):
    """The session's ``ray start --head`` (token auth, tests/conftest.py): ``(jobs API URL, GCS address, token)``."""
    return ray_cluster.url, ray_cluster.gcs, ray_cluster.token


def _tiny_job(tmp_path: Path, tiny_priors, n: int = 5, steps: int = 2) -> tuple[Path, Path]:
    """Observation shards (one broken row) and a working dir holding a clean config for the tiny priors."""
    from tests.test_clean_job import _cfg, _observations

    _observations(str(tmp_path / "obs"), n=n, shard_size=3)
    wd = tmp_path / "wd"
    (wd / "configs").mkdir(parents=True)
    cfg = _cfg(tiny_priors, steps=steps, gpus_per_actor=0, threads_per_actor=1)
    (wd / "configs" / "clean.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return tmp_path / "obs", wd


def test_submit_clean_runs_on_a_token_authenticated_head(ray_head, tiny_priors, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.data.accounting import check_run
    from pipeline.summary import read_summaries

    url, _, token = ray_head
    obs, wd = _tiny_job(tmp_path, tiny_priors)
    out = tmp_path / "out"
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the machine's user
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.chdir(wd)  # a folder without the code: `submit` ships the package (py_modules)
    # relative paths, as a user types them: made absolute file:// URIs before the job sees them
    rc = main(["submit", "clean", "../obs", "../out", "--config", "configs/clean.yaml", "--address", url,
               "--follow", "--job-id", "jd-test-clean"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert captured.out.splitlines()[0] == "jd-test-clean"
    assert "clean run-" in captured.out  # the job's own log lines, followed
    assert "job jd-test-clean: SUCCEEDED" in captured.err
    assert token not in captured.out + captured.err

    (summary,) = read_summaries(str(out)).to_pylist()  # the job wrote its outputs and its summary row
    assert (summary["inputs"], summary["cleaned"], summary["errors"], summary["executor"]) == (5, 4, 1, "ray")
    assert check_run(str(obs), f"{out}/runs/{summary['run_id']}").ok

    assert main(["submit", "status", "jd-test-clean", "--address", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "SUCCEEDED" and status["driver_exit_code"] == 0
    assert status["entrypoint"] == (f"python3 -m pipeline.jobs.entry clean file://{obs} file://{out} "
                                    "--config configs/clean.yaml")
    # the head's python3 is not the one that runs Ray (tests/raycluster.py): the job found Ray's own
    assert "running the job with Ray's own Python" in captured.out
    assert status["metadata"]["jointdiff"] == "clean"
    assert main(["submit", "logs", "jd-test-clean", "--address", url]) == 0
    assert f"run {summary['run_id']}" in capsys.readouterr().out or summary["run_id"] in captured.out
    assert main(["submit", "list", "--address", url]) == 0
    assert "jd-test-clean" in capsys.readouterr().out


def test_submit_learn_prior_runs_the_em_job_on_a_token_authenticated_head(ray_head, tiny_priors, tmp_path,
                                                                          monkeypatch, capsys):
    """`jointdiff submit learn-prior` with relative paths (a broken row in the input): the EM job runs on the
    cluster without Prefect, publishes round 0 and round 1 to the registry under OUTPUT, and prints its result."""
    import os

    from pipeline.cli import main

    url, _, token = ray_head
    obs, wd = _tiny_job(tmp_path, tiny_priors, n=6)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.chdir(wd)
    noise = os.path.relpath(tiny_priors[1], wd)  # a model folder here, as the user types it
    rc = main(["submit", "learn-prior", "../obs", "../out", "--noise-prior", noise, "--rounds", "1",
               "--config", "configs/clean.yaml", "--set", "forward.alpha=0.5",
               *[x for s in ("train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
                             "train.checkpoint_every=2", "train.threads=1") for x in ("--prior-set", s)],
               "--run-id", "em", "--quiet", "--address", url, "--follow", "--job-id", "jd-test-learn"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "job jd-test-learn: SUCCEEDED" in captured.err and token not in captured.out + captured.err
    assert "round 0: a per-pixel Gaussian of 5 observations" in captured.out  # the broken row left out
    result = json.loads([line for line in captured.out.splitlines() if line.startswith('{"run_id": "em"')][-1])
    root = tmp_path / "out" / "learn" / "em"
    assert result["root"] == root.as_uri() and result["chosen"] in (0, 1)
    assert json.loads((tmp_path / "out" / "models" / "image" / "latest.json").read_text()) == {
        "version": f"em-round-{result['chosen']}"}
    for k in (0, 1):
        record = json.loads((root / f"round-{k}" / "round.json").read_text())
        assert record["cleaned_rows"] == 5 and record["errors"] == 1 and record["noise_fit"] > 0
    assert main(["submit", "status", "jd-test-learn", "--address", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["entrypoint"].startswith(f"python3 -m pipeline.jobs.entry learn-prior file://{obs} "
                                           f"file://{tmp_path}/out --noise-prior file://{tiny_priors[1]} ")


def test_a_submission_without_the_right_token_is_refused(ray_head, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    url, _, token = ray_head
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "clean", "in", "out", "--address", url]) == 2
    err = capsys.readouterr().err
    assert "requires an auth token" in err and "RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-" + token)
    assert main(["submit", "status", "whatever", "--address", url]) == 2
    err = capsys.readouterr().err
    assert "refused this process's token" in err and token not in err


def test_a_submitted_job_can_be_stopped(ray_head, tiny_priors, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    url, _, token = ray_head
    obs, wd = _tiny_job(tmp_path, tiny_priors, n=6, steps=2000)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert main(["submit", "clean", str(obs), str(tmp_path / "out"), "--config", str(wd / "configs" / "clean.yaml"),
                 "--working-dir", str(wd), "--address", url, "--job-id", "jd-test-stop"]) == 0
    client = sj.connect(url)
    deadline = time.time() + 60
    while str(client.get_job_status("jd-test-stop").value) == "PENDING":
        assert time.time() < deadline
        time.sleep(0.5)
    assert main(["submit", "stop", "jd-test-stop", "--address", url]) == 0
    while str(client.get_job_status("jd-test-stop").value) not in sj.TERMINAL:
        assert time.time() < deadline + 60
        time.sleep(0.5)
    assert str(client.get_job_status("jd-test-stop").value) == "STOPPED"
    assert "stop requested" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The Prefect deployments: registered with `prefect deploy`, a scheduled run picked up by a worker

def test_prefect_deploy_registers_both_deployments_and_a_worker_completes_a_scheduled_run(
        prefect_harness, ray_head, tiny_priors, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from pipeline.summary import read_summaries

    url, _, token = ray_head
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    prefect = shutil.which("prefect", path=env["PATH"])

    def cli(*args, extra_env=None, timeout=300):
        res = subprocess.run([prefect, "--no-prompt", *args], cwd=REPO, env={**env, **(extra_env or {})},
                             capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    pool = _yaml(DEPLOY / "prefect.yaml")["definitions"]["work_pool"]["name"]
    cli("work-pool", "create", pool, "--type", "process")
    cli("deploy", "--prefect-file", "deploy/prefect.yaml", "--all")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("clean-dataset/nightly")
        manual = client.read_deployment_by_name("train-priors/manual")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC" and not manual.schedules
    assert nightly.work_pool_name == manual.work_pool_name == pool
    assert nightly.parameters["config"] == "configs/denoise.yaml" and nightly.entrypoint.endswith("clean_dataset")

    # One run of the nightly deployment, now, on the tiny data: this test's head instead of the cluster's
    obs, wd = _tiny_job(tmp_path, tiny_priors)
    params = {"input_uri": str(obs), "output": str(tmp_path / "out"), "config": "configs/clean.yaml",
              "overrides": []}
    # the deployment reaches the cluster through its Jobs API (no Ray driver in the worker)
    job_vars = {"working_dir": str(wd), "env": {"RAY_API_SERVER_ADDRESS": url, "PYTHONUNBUFFERED": "1"}}
    out = cli("deployment", "run", "clean-dataset/nightly", "--params", json.dumps(params),
              "--job-variable", f"working_dir={wd}", "--job-variable", f"env={json.dumps(job_vars['env'])}")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    # the worker holds the cluster's token in its environment (never in the deployment)
    cli("worker", "start", "--pool", pool, "--run-once", extra_env={"RAY_AUTH_TOKEN": token}, timeout=420)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_completed(), run.state
    assert run.job_variables["working_dir"] == str(wd)
    (summary,) = read_summaries(str(tmp_path / "out")).to_pylist()
    assert (summary["inputs"], summary["cleaned"], summary["errors"]) == (5, 4, 1)
    os.environ["RAY_AUTH_TOKEN"] = token  # this process asks the cluster too
    try:
        jobs = [j for j in sj.connect(url).list_jobs() if (j.metadata or {}).get("working_dir") == str(wd)]
    finally:
        del os.environ["RAY_AUTH_TOKEN"]
    assert [(j.metadata["jointdiff"], str(j.status.value)) for j in jobs] == [("clean", "SUCCEEDED")]


def test_the_flow_fails_when_its_submitted_job_fails(prefect_harness, ray_head, tiny_priors, tmp_path, monkeypatch):
    from flows.clean_dataset import JobFailed, clean_dataset

    url, _, token = ray_head
    obs, wd = _tiny_job(tmp_path, tiny_priors)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.chdir(wd)
    # a model the cluster does not have: the job's own checks refuse it there (exit 2)
    state = clean_dataset(str(obs), str(tmp_path / "out"), config="configs/clean.yaml",
                          overrides=[f"priors.image={tmp_path}/no-such-model"], progress=False, jobs_address=url,
                          return_state=True)
    assert state.is_failed()
    with pytest.raises(JobFailed, match=r"clean job .* FAILED \(exit code 2\)"):  # a config error: no retry
        state.result()
    assert not (tmp_path / "out" / "summary").exists()
