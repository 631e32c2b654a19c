from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
import torch

# Prefect and Ray settings for the whole test session (and the CLI subprocesses it starts): a private,
# throw-away Prefect home with no analytics; Ray's token auth off (tests that test auth turn it on).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="jointdiff-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["RAY_AUTH_MODE"] = "disabled"

from pipeline.config import PriorConfig


@pytest.fixture(autouse=True)
def _torch_threads():
    # 2, or fewer where OMP_NUM_THREADS says so (tests beside a training job: two threads spin against it)
    torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS") or 2)))


def tiny_config(output: str, **train) -> PriorConfig:
    """A prior small enough to train for a few steps in a test (16x16 digits, ~20k parameters)."""
    return PriorConfig.model_validate({
        "name": "tiny",
        "data": {"source": "digits", "split": "train", "size": 16, "channels": 1},
        "unet": {"image_size": 16, "channels": 1, "base_channels": 8, "channel_mults": [1, 2],
                 "num_res_blocks": 1, "attention_resolutions": [8]},
        "train": {"steps": 10, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2,
                  "checkpoint_every": 3, "seed": 0, **train},
        "output": output,
    })


def train_tiny_patch_prior(folder, name: str, data: dict, channels: int) -> str:
    """``jointdiff train`` of a 16x16 prior of ``channels`` for 2 steps on ``data`` (the config's ``data``
    section, ``channels`` added), in ``folder``; the model's path."""
    import yaml

    from pipeline.cli import main

    cfg = {"name": name, "data": {**data, "channels": channels},
           "unet": {"image_size": 16, "channels": channels, "base_channels": 8, "channel_mults": [1, 2],
                    "attention_resolutions": []},
           "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "warmup_steps": 1, "threads": 1},
           "output": str(folder / "train" / name)}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(folder / f"{name}.yaml"), "--quiet"]) == 0
    return str(folder / "train" / name / "model")


def cli(capsys, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``jointdiff ARGS`` run by the CLI's ``main`` in this process (the same parsing, messages and exit codes as
    the command, without a new interpreter that imports torch again): its exit code and what it printed.
    tests/test_cli.py runs the command itself as a subprocess."""
    from pipeline.cli import main

    capsys.readouterr()  # only what this command prints
    rc = main(list(args))
    out = capsys.readouterr()
    if check and rc != 0:
        raise AssertionError(f"jointdiff {' '.join(args)} failed ({rc}):\n{out.err}")
    return subprocess.CompletedProcess(["jointdiff", *args], rc, out.out, out.err)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol endpoint: moto's server on 127.0.0.1 (a free port), for the whole session."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An empty bucket on the moto server, reachable through the standard AWS environment variables
    (as a user would configure it); yields ``(bucket URI, endpoint)``."""
    import uuid

    import s3fs

    from pipeline.data import storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-print")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    storage.configure(None)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.open_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    yield f"s3://{bucket}", s3_server
    s3fs.S3FileSystem.clear_instance_cache()


def start_test_ray() -> None:
    """The session's local Ray: a new instance (``address="local"``, as the product starts one), never a cluster
    that a ``ray start`` left behind in ``/tmp/ray/ray_current_cluster``, live or dead."""
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
             object_store_memory=256 * 1024**2, log_to_driver=True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 4 logical CPUs on the 2 real cores, and one logical GPU so that
    GPU scheduling is exercised (actors that request it still run on the CPU)."""
    import ray

    start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real multi-process cluster for the session (tests/raycluster.py): ``ray start --head`` on 127.0.0.1
    with token authentication, started the way a user who did not activate the project's virtualenv would (its
    ``python3`` is the system one); stopped at the end."""
    import secrets

    from tests.raycluster import Cluster

    cluster = Cluster(num_cpus=4, token=secrets.token_hex(16))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API and database), once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def tiny_priors(tmp_path_factory):
    """Two tiny 16x16 priors (2 training steps each): ``(image prior, noise prior)`` model folders."""
    from pipeline.training import train_prior

    root = tmp_path_factory.mktemp("tiny-priors")
    models = []
    for name in ("img", "noise"):
        train_prior(tiny_config(str(root / name), steps=2, checkpoint_every=2).model_copy(update={"name": name}),
                    progress=False)
        models.append(str(root / name / "model"))
    return tuple(models)


# A guidance rule the tests define (one function, one registration; the product ships none like it): the
# Gaussian likelihood of PiGDM with the gradient through both networks. For Gaussian priors and the `sde`
# schedule it is the exact posterior SDE, which tests/test_posterior.py checks against the closed form.
from pipeline.posterior import guidance as _guidance  # noqa: E402


@_guidance.register_rule("exact-gaussian", weights=(1.0, 1.0))
def exact_gaussian(d, x, n, t):
    return _guidance.through_networks(d, x, n, t, _guidance.gaussian_nll)
