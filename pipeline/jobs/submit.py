"""``jointdiff submit``: run training or cleaning on a Ray cluster through the Ray Jobs API.

A thin client over :class:`ray.job_submission.JobSubmissionClient`, the API behind ``ray job submit``.
The job's entry point is the same command the user would run in place, ``jointdiff clean ARGS`` or
``jointdiff train ARGS``, as ``python3 -m pipeline.jobs.entry KIND ARGS`` (:mod:`pipeline.jobs.entry`:
it runs the job with the Python that runs Ray when the head's ``python3`` lacks the requirements, and
says in one line what the cluster is missing otherwise). The arguments are checked here by the real
argument parser first, so a typo fails on the laptop and not on the cluster, and local INPUT/OUTPUT paths
become absolute ``file://`` URIs (the job runs in a folder of its own). The runtime environment comes
from ``deploy/runtime_env.yaml`` (the file the KubeRay ``RayJob`` manifests and the Prefect deployments
share); the ``pipeline`` package itself travels as a ``py_modules`` entry, so the job runs this code
whatever the cluster has installed and whatever folder it is submitted from; the working directory is
shipped too, and the config file goes with it (it must live inside the working directory; its path is
rewritten relative to it).

Addresses: ``--address http://HEAD:8265`` is the Ray Jobs API (the dashboard's port, as for
``ray job submit``; default ``RAY_API_SERVER_ADDRESS``). It is not ``--ray-address`` of
``jointdiff clean``/``train``, which names a Ray cluster's GCS (``HEAD:6379`` or ``auto``) for a driver
on a machine of the cluster. ``ray://`` (Ray Client) is refused everywhere: Ray Data cannot run under it.

Authentication: Ray 2.60 clusters require a token by default. It is read the way Ray reads it --
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` -- and
sent as an ``Authorization: Bearer`` header whatever this process's ``RAY_AUTH_MODE`` is. It is
never printed, and never shipped.

Secrets: a job's entry point and runtime env are shown to anyone who can see the cluster (the dashboard,
``jointdiff submit list``/``status``, ``ray job list``), and the working directory is copied to it. So,
before anything is sent, ``submit`` refuses storage credentials and options among the job's ``--set``
overrides (:func:`pipeline.config.refuse_credentials`, the same rule as the flows' parameters) and
credential-like ``env_vars`` in the runtime env (:func:`check_env_vars`), and it leaves keys, certificates,
``.env`` and credential files out of the working directory (:data:`SECRET_FILES`), saying which in one line.
A job reaches buckets with the cluster's own identity: an instance profile, a Kubernetes service account
(IRSA), or a secret mounted on the nodes.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pipeline
from pipeline.config import ConfigError, check_run_id, refuse_credentials
from pipeline.untrusted import read_yaml

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ENTRYPOINTS = {"clean": "pipeline.jobs.clean", "train": "pipeline.jobs.train_prior",
               "learn-prior": "pipeline.jobs.learn"}
CLEAN_FLAGS = ("--quiet", "-h", "--help")  # the options of `jointdiff clean` that take no value
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RUNTIME_ENV_FILE = "deploy/runtime_env.yaml"  # relative to the working directory
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
SECRET_FILES = (".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*", "id_dsa*",
                "id_ecdsa*", "id_ed25519*", ".ssh/", ".aws/", ".kube/", ".docker/", ".gnupg/", "credentials",
                "credentials.*", ".netrc", "_netrc", ".pgpass", ".git-credentials", ".pypirc", ".npmrc", ".s3cfg",
                ".boto", "kubeconfig", "*.kubeconfig")
"""Never shipped in a job's working directory: Ray ``excludes`` (gitignore patterns, at any depth) added to those
of the runtime env file."""
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE_KEY|ACCESS_KEY|ACCOUNT_KEY|"
                        r"STORAGE_KEY|CONNECTION_STRING|^FSSPEC_", re.IGNORECASE)
"""Runtime env variable names that hold a credential (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ACCESS_KEY_ID``, ``RAY_AUTH_TOKEN``, Azure's ``AZURE_STORAGE_KEY`` and connection strings, fsspec's
``FSSPEC_<PROTOCOL>[_<OPTION>]`` storage options...), except :data:`IDENTITY_ENV` and names that end in ``_FILE``
or ``_PATH``: those name a file on the nodes (``AWS_WEB_IDENTITY_TOKEN_FILE``, IRSA's token), which is how the
cluster's own identity is given."""
IDENTITY_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_SHARED_CREDENTIALS_FILE")
"""Credential-sounding names that point at the cluster's own identity (a mounted key file, EKS Pod Identity's
endpoint), not a credential."""


def read_token() -> str | None:
    """The Ray auth token from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH names {path}, which is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def jobs_address(address: str | None) -> str:
    """The Ray Jobs API address: ``address``, else ``RAY_API_SERVER_ADDRESS``; must be ``http(s)://``."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ConfigError("no Ray Jobs API address: give --address http://HEAD:8265 (the dashboard port, as "
                          f"for `ray job submit`) or set {ADDRESS_ENV}")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r} is not a Ray Jobs API address: it must look like "
                          "http://HEAD:8265 (the dashboard port). A HEAD:6379 address names the cluster itself: use it "
                          "with `jointdiff clean --ray-address` on a machine of the cluster instead")
    return address.rstrip("/")


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client with the auth token (if any) in its headers; clear errors when refused."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    token = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        raise ConfigError(_auth_message(url, token is not None)) from None
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach the Ray Jobs API at {url}: is the head running, and is its dashboard "
                          "port (8265) reachable from here (e.g. `kubectl port-forward svc/HEAD-svc 8265`)?") from exc


def _auth_message(url: str, had_token: bool) -> str:
    if had_token:
        return (f"the Ray cluster at {url} refused this process's token: check RAY_AUTH_TOKEN / "
                "RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token against the cluster's token")
    return (f"the Ray cluster at {url} requires an auth token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file "
            "holding it, or put it in ~/.ray/auth_token (on KubeRay: the auth_token key of the cluster's Secret)")


def load_runtime_env(working_dir: Path, path: str | None = None) -> dict[str, Any]:
    """The runtime environment of ``path`` (default ``deploy/runtime_env.yaml`` in ``working_dir``, if there),
    with its ``working_dir`` set to ``working_dir``."""
    file = Path(path) if path else working_dir / RUNTIME_ENV_FILE
    env: dict[str, Any] = {}
    if path or file.is_file():
        try:
            env = read_yaml(file, f"runtime env file {file}") or {}  # bounded; errors say where, not what
        except FileNotFoundError:
            raise ConfigError(f"runtime env file {file} does not exist") from None
        if not isinstance(env, dict):
            raise ConfigError(f"runtime env file {file} must hold a mapping (working_dir, excludes, env_vars...)")
    env = dict(env)
    env["working_dir"] = str(working_dir)
    # the code itself travels with the job, whatever the working directory holds and whatever the cluster has
    # installed: the job runs this jointdiff (its requirements must be on the cluster: pipeline/jobs/entry.py)
    env["py_modules"] = [*env.get("py_modules", []), str(Path(pipeline.__file__).resolve().parent)]
    return env


def check_env_vars(env: dict[str, Any], source: str) -> None:
    """Refuse credential-like ``env_vars`` (:data:`SECRET_ENV`) in the runtime env from ``source``, naming the
    variables and never their values: a runtime env is shown on the Ray dashboard and by ``ray job status``."""
    names = [str(k) for k in (env.get("env_vars") or {}) if SECRET_ENV.search(str(k))
             and not str(k).upper().endswith(("_FILE", "_PATH")) and str(k).upper() not in IDENTITY_ENV]
    if names:
        raise ConfigError(
            f"runtime env {source}: env_vars {', '.join(names)} may not be shipped: a job's runtime env is shown "
            "by the Ray dashboard and `ray job status`. Jobs reach buckets with the cluster's own identity (an "
            "instance profile, a Kubernetes service account, or a secret mounted on the nodes), and `submit` sends "
            "the Ray token (RAY_AUTH_TOKEN) as a header, never with the job")


CREDENTIAL_KEY = re.compile(r"^(key|secret|token)$|secret|token|password|passwd|credential|access_key|account_key|"
                            r"connection_string|private_key", re.IGNORECASE)


def check_config_credentials(config: Path, shown: str) -> None:
    """Refuse a config file whose ``storage:`` section (at its top or in a recipe's section) holds credentials:
    ``storage.key``, ``storage.secret``, ``storage.token`` or an option named like one. The file travels to the
    cluster in the job's working directory, where whoever can run jobs can read it."""
    from pipeline.untrusted import read_yaml

    doc = read_yaml(config, f"--config {shown}")
    sections = [doc] + [v for v in doc.values() if isinstance(v, dict)] if isinstance(doc, dict) else []
    found = []
    for section in sections:
        store = section.get("storage")
        if not isinstance(store, dict):
            continue

        def walk(node: dict[str, Any], path: str) -> None:
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(v, f"{path}.{k}")
                elif v not in (None, "") and CREDENTIAL_KEY.search(str(k)):
                    found.append(f"{path}.{k}")
        walk(store, "storage")
    if found:
        raise ConfigError(f"--config {shown}: {', '.join(sorted(set(found)))} would travel to the cluster with the "
                          "job's working directory, readable by whoever runs jobs there: leave credentials out of a "
                          "submitted config; jobs reach buckets with the cluster's own identity (an instance profile, "
                          "a Kubernetes service account, or a secret mounted on the nodes)")


def left_out(working_dir: Path, excludes: Sequence[str]) -> list[str]:
    """The files and folders of ``working_dir`` that :data:`SECRET_FILES` keeps from being shipped (folders end
    in ``/``), leaving aside those that ``excludes`` (the runtime env file's) skip anyway; matched as Ray does."""

    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to runtime env excludes

    theirs = PathSpec.from_lines("gitwildmatch", excludes)
    ours = PathSpec.from_lines("gitwildmatch", SECRET_FILES)
    found = []
    for root, dirs, files in os.walk(working_dir):
        base = Path(root).relative_to(working_dir)
        for d in list(dirs):
            rel = (base / d).as_posix()
            if theirs.match_file(rel) or theirs.match_file(rel + "/") or ours.match_file(rel + "/"):
                dirs.remove(d)
                if not (theirs.match_file(rel) or theirs.match_file(rel + "/")):
                    found.append(rel + "/")
        found += [rel for rel in ((base / f).as_posix() for f in files)
                  if ours.match_file(rel) and not theirs.match_file(rel)]
    return sorted(found)


def job_runtime_env(working_dir: Path, path: str | None = None,
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """The runtime env ``submit`` sends: :func:`load_runtime_env`, its ``env_vars`` checked
    (:func:`check_env_vars`), :data:`SECRET_FILES` added to its ``excludes``; one line to ``log`` naming the files
    of ``working_dir`` that this leaves out, if any."""
    env = load_runtime_env(working_dir, path)
    check_env_vars(env, path or str(working_dir / RUNTIME_ENV_FILE))
    own = [str(x) for x in env.get("excludes") or []]
    env["excludes"] = own + [p for p in SECRET_FILES if p not in own]
    found = left_out(working_dir, own)
    if found:
        more = f", and {len(found) - 20} more" if len(found) > 20 else ""
        log(f"left out of the working dir (keys, certificates, .env and credential files are never shipped): "
            f"{', '.join(found[:20])}{more}")
    return env


def _option(args: list[str], name: str) -> int | None:
    """Index of the value of ``--name VALUE`` / ``--name=VALUE`` in ``args`` (the last one), else None."""
    found = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            found = i + 1
        elif a.startswith(name + "="):
            found = i
    return found


def _value(args: list[str], i: int, name: str) -> str:
    """The value at ``args[i]`` (:func:`_option`'s index): of ``--name=VALUE`` or of ``--name VALUE``."""
    return args[i].split("=", 1)[1] if args[i].startswith(f"{name}=") else args[i]


def _replace_value(args: list[str], i: int, name: str, value: str) -> None:
    """Put ``value`` at ``args[i]`` in the form the user wrote (``--name=VALUE`` or ``--name VALUE``)."""
    args[i] = f"{name}={value}" if args[i].startswith(f"{name}=") else value


def job_command(kind: str, job_args: Sequence[str], working_dir: Path) -> list[str]:
    """The job's entry point as argv: ``python -m <module> ARGS``, checked by the real parser, with the
    config path made relative to ``working_dir`` (the job runs there, on the cluster)."""
    from pipeline.data.storage import absolute_uri
    from pipeline.jobs.commands import LEARN_FLAGS, clean_parser, learn_parser, train_parser

    if kind not in ENTRYPOINTS:
        raise ConfigError(f"cannot submit {kind!r}: choose one of {', '.join(ENTRYPOINTS)}")
    args = list(job_args)
    if any(a == "--ray-address" or a.startswith("--ray-address=") for a in args):
        raise ConfigError("--ray-address is set by the cluster for a submitted job (RAY_ADDRESS); leave it out")
    for flag in ("--config", "--prior-config"):  # learn-prior has two config files
        i = _option(args, flag)
        if i is None:
            continue
        value = _value(args, i, flag)
        config = Path(value).expanduser().resolve()
        if not config.is_file():
            raise ConfigError(f"{flag} {value}: no such file")
        try:
            rel = config.relative_to(working_dir.resolve())
        except ValueError:
            raise ConfigError(f"{flag} {value} is outside the working directory {working_dir}, which is what is "
                              "shipped to the cluster: move it inside, or pass --working-dir") from None
        _replace_value(args, i, flag, str(rel))
        check_config_credentials(config, value)
    if kind == "train":
        parser = train_parser("jointdiff train")
    elif kind == "learn-prior":
        parser = learn_parser("jointdiff learn-prior")
    else:
        parser = clean_parser("jointdiff clean", executor=False)
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exc:  # argparse printed the problem; the arguments are not repeated (a value may be secret)
        raise ConfigError(f"the arguments for `{kind}` were refused by its parser (above)") from exc
    # the arguments become the job's entry point, shown by the dashboard
    refuse_credentials(parsed.set)
    refuse_credentials(getattr(parsed, "prior_set", []), "--prior-set")
    if getattr(parsed, "run_id", None) is not None:  # refused here, not minutes later on the cluster
        check_run_id(parsed.run_id, "--run-id")
    if kind == "clean":
        args = _absolute_positionals(args, [parsed.input, parsed.output])
    if kind == "learn-prior":
        args = _absolute_positionals(args, [parsed.input, parsed.output], LEARN_FLAGS)
        # local paths as the job will find them (a prior's: a model folder or a registry's .../latest; a shipped
        # prior's name stays a name)
        from pipeline.priors import SHIPPED

        for flag in ("--validation", "--registry", "--start", "--noise-prior"):
            i = _option(args, flag)
            if i is None or "://" in (value := _value(args, i, flag)) or value in SHIPPED:
                continue
            _replace_value(args, i, flag, absolute_uri(value))
    return ["python3", "-m", "pipeline.jobs.entry", kind, *args]


def _absolute_positionals(args: list[str], values: list[str | None],
                          flags: Sequence[str] = CLEAN_FLAGS) -> list[str]:
    """``args`` with the positional INPUT and OUTPUT, where local paths, made absolute ``file://`` URIs (the
    job runs in a folder of its own on the cluster, where a relative path means something else)."""
    from pipeline.data.storage import absolute_uri

    out, skip, todo = [], False, [v for v in values if v]
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = "=" not in a and a not in flags  # an option's value is never a positional
        elif not a.startswith("-") and todo and a == todo[0]:
            a = absolute_uri(todo.pop(0))
        out.append(a)
    return out


def submit(kind: str, job_args: Sequence[str], address: str | None = None, *, working_dir: str | Path = ".",
           runtime_env: str | None = None, submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> str:
    """Submit ``jointdiff <kind> ARGS`` as a Ray job; returns its submission id."""
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: no such folder")
    argv = job_command(kind, job_args, wd)
    env = job_runtime_env(wd, runtime_env, log)
    client = connect(address)
    submission_id = submission_id or (f"jointdiff-{kind}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-"
                                      f"{secrets.token_hex(2)}")
    metadata = {"jointdiff": kind, "submitted_by": getpass.getuser(), "working_dir": str(wd)}
    log(f"submitting `{shlex.join(argv)}` to {jobs_address(address)} (working dir {wd})")
    job_id = client.submit_job(entrypoint=shlex.join(argv), submission_id=submission_id, runtime_env=env,
                               metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus)
    return job_id


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> str:
    """Print the job's logs as they grow (to ``out``, default stdout) until it ends; returns its final status."""
    out = out or sys.stdout
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def describe(client: JobSubmissionClient, job_id: str) -> dict[str, Any]:
    """Status, message, entry point and times of one job, as plain values."""
    info = client.get_job_info(job_id)

    def stamp(ms: int | None) -> str | None:
        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds") if ms else None

    return {"job_id": info.submission_id or info.job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": stamp(info.start_time), "end_time": stamp(info.end_time),
            "metadata": info.metadata or {}, "driver_exit_code": info.driver_exit_code}
