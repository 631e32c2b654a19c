"""Object-storage failures before and during a run: one line naming the URI and the cause, never a
traceback, never a bucket created (issue 16, item 8). Real S3 protocol: moto's server, with IAM
authentication switched on where credentials are under test (moto checks signatures and permissions
only when told to: ``moto.core.enable_iam_authentication``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import storage
from pipeline.data.corrupt import corrupt, write_observations
from pipeline.data.embedded import load_embedded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_moto_server():
    """The in-process moto server logs each request (werkzeug, INFO), and once Prefect is imported those
    lines reach stderr, where these tests read what jointdiff prints: keep the server quiet."""
    import logging

    log = logging.getLogger("werkzeug")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


def _observations(uri: str, n: int = 4) -> None:
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), n, seed=0)
    write_observations(uri, obs, shard_size=2)


def _buckets() -> set[str]:
    fs, _ = storage.open_fs("s3://")
    fs.invalidate_cache()
    return {p.rstrip("/") for p in fs.ls("", refresh=True)}


def _keys(uri: str) -> list[str]:
    fs, path = storage.open_fs(uri)
    fs.invalidate_cache()
    return fs.find(path) if fs.exists(path) else []


def _error_line(err: str) -> str:
    """The error a user sees: stderr less the informational lines, `storage: {...}` (which endpoint is used) and
    `sampler: no tuned weights ...` (the tiny test priors have none)."""
    lines = [ln for ln in err.splitlines()
             if ln.strip() and not ln.startswith(("storage: {", "sampler: no tuned weights"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nothing listens there


@contextmanager
def _iam(endpoint: str, deny: list[dict] | None = None):
    """IAM authentication on the moto server, with a user allowed s3:* (less the ``deny`` statements) and
    one allowed nothing; yields ``{"ok": (key, secret), "denied": (key, secret)}``. Off again afterwards."""
    import boto3
    from moto.core import enable_iam_authentication

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing-key",
                       aws_secret_access_key="testing-secret")
    users = {}
    for role in ("ok", "denied"):
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        if role == "ok":
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}, *(deny or [])]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[role] = (key["AccessKeyId"], key["SecretAccessKey"])
    with enable_iam_authentication():
        yield users


def _clean(capsys, *args: str) -> tuple[int, str]:
    rc = main(["clean", *args, "--set", "sampler.steps=2", "--quiet"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown key", "wrong secret", "not allowed"])
def test_wrong_credentials_are_one_line_before_any_work(s3, monkeypatch, capsys, case):
    bucket, endpoint = s3
    _observations(f"{bucket}/obs")
    with _iam(endpoint) as users:
        key, secret = {"unknown key": ("AKIAUNKNOWN0000000000", "whatever"),
                       "wrong secret": (users["ok"][0], "not-the-secret"),
                       "not allowed": users["denied"]}[case]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        rc, err = _clean(capsys, f"{bucket}/obs", f"{bucket}/out")
        line = _error_line(err)
        assert rc == 2, err
        assert line.startswith(f"jointdiff: {bucket}/obs: cannot read the input: ")
        assert {"unknown key": "(InvalidAccessKeyId)", "wrong secret": "(SignatureDoesNotMatch)",
                "not allowed": "access denied (AccessDenied)"}[case] in line
        assert secret not in err
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", users["ok"][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", users["ok"][1])
        assert _keys(f"{bucket}/out") == []  # nothing was written


def test_missing_input_bucket_is_one_line(s3, capsys):
    bucket, _ = s3
    rc, err = _clean(capsys, "s3://no-such-input-bucket/obs", f"{bucket}/out")
    assert rc == 2
    assert _error_line(err) == ("jointdiff: s3://no-such-input-bucket/obs: cannot read the input: the bucket "
                                "'no-such-input-bucket' does not exist (NoSuchBucket)")
    assert _keys(f"{bucket}/out") == []


def test_missing_output_bucket_is_refused_and_never_created(s3):
    """Through the real command (a subprocess), as a user meets it."""
    import os

    bucket, _ = s3
    _observations(f"{bucket}/obs")
    typo = f"typo-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "clean", f"{bucket}/obs", f"s3://{typo}/cleaned",
                           "--set", "sampler.steps=2", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _error_line(proc.stderr) == (
        f"jointdiff: s3://{typo}/cleaned: cannot write the output: the bucket '{typo}' does not exist "
        "(NoSuchBucket); jointdiff does not create buckets: create it first, or fix the name")
    assert typo not in _buckets()


def test_unreachable_endpoint_is_one_line(s3, monkeypatch, capsys):
    bucket, _ = s3
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    rc, err = _clean(capsys, f"{bucket}/obs", f"{bucket}/out")
    assert rc == 2
    assert _error_line(err) == (f"jointdiff: {bucket}/obs: cannot read the input: cannot reach the endpoint "
                                f"http://127.0.0.1:{port} (connection refused); check AWS_ENDPOINT_URL or "
                                "storage.endpoint_url, and the network")


def test_clean_ingest_and_the_flow_check_before_they_start(s3, tmp_path, capsys):
    """`jointdiff clean` refuses before Ray starts, `ingest` before it reads a file, the Prefect flow
    before its first task; none of them creates the bucket."""
    from flows.clean_dataset import clean_dataset
    from pipeline.config import ConfigError

    bucket, _ = s3
    _observations(f"{bucket}/obs")
    typo = f"typo-{uuid.uuid4().hex[:8]}"
    assert main(["clean", f"{bucket}/obs", f"s3://{typo}/out", "--quiet"]) == 2
    assert f"s3://{typo}/out: cannot write the output: the bucket '{typo}' does not exist" in \
        _error_line(capsys.readouterr().err)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"not read")
    assert main(["ingest", str(tmp_path / "photos"), f"s3://{typo}/ds", "--quiet"]) == 2
    assert f"s3://{typo}/ds: cannot write the output: the bucket '{typo}'" in _error_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match=f"s3://{typo}/out: cannot write the output"):
        clean_dataset.fn(f"{bucket}/obs", f"s3://{typo}/out")
    assert typo not in _buckets()


def test_writing_into_a_missing_bucket_never_creates_it(s3, capsys):
    """Commands without a preflight (export-embedded) write through storage.write_atomic and
    write_dataset, whose makedirs used to create the bucket: now NoSuchBucket, one line, no bucket."""
    typo = f"typo-{uuid.uuid4().hex[:8]}"
    rc = main(["export-embedded", "digits", f"s3://{typo}/digits", "--n", "3"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 1
    assert line.startswith(f"jointdiff export-embedded: storage error: s3://{typo}/digits/shard-00000.parquet: "
                           f"the bucket '{typo}' does not exist (NoSuchBucket)"), line
    assert typo not in _buckets()


def test_a_storage_error_half_way_is_one_line_naming_the_uri(s3, monkeypatch, capsys):
    """Credentials that stop working after the checks (expired, revoked) meet the catch in the CLI:
    here `jointdiff report` reads a run folder with a wrong secret."""
    bucket, endpoint = s3
    with _iam(endpoint) as users:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", users["ok"][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "expired")
        rc = main(["report", f"{bucket}/out/runs/run-x"])
        line = _error_line(capsys.readouterr().err)
    assert rc == 1
    assert line.startswith(f"jointdiff report: storage error: {bucket}/out/runs/run-x"), line
    assert "access denied (403 Forbidden): wrong credentials, or credentials not allowed" in line


def test_storage_refusing_a_write_half_way_through_a_run_is_one_line(s3, tiny_priors, monkeypatch, capsys):
    """The checks pass (the input reads, a probe object is written under the output), then the run's own
    writes under OUTPUT/runs/ are refused, as when credentials expire or a policy changes mid-run."""
    bucket, endpoint = s3
    _observations(f"{bucket}/obs", n=2)
    deny = {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket[5:]}/out/runs/*"}
    with _iam(endpoint, deny=[deny]) as users:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", users["ok"][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", users["ok"][1])
        rc = main(["clean", f"{bucket}/obs", f"{bucket}/out", "--set", f"priors.image={tiny_priors[0]}",
                   "--set", f"priors.noise={tiny_priors[1]}", "--set", "sampler.steps=2", "--quiet"])
        line = _error_line(capsys.readouterr().err)
    assert rc == 1
    assert line.startswith(f"jointdiff clean: storage error: {bucket}/out/runs/run-"), line
    assert line.endswith("access denied (AccessDenied): these credentials may not do this; check the key's "
                         "permissions on the bucket"), line
