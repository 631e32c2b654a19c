"""One way to reach any fsspec URI (``file://``, plain paths, ``memory://``, ``s3://`` ...).

Credentials and endpoint come from a :class:`StorageConfig` (the ``storage:`` section of a config)
or, where it leaves them unset, from the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``). The secret is a pydantic
``SecretStr``: it prints as ``**********`` and :meth:`StorageConfig.describe` leaves it out, so it never
reaches a log or an output file.

fsspec (s3fs) and pyarrow get the same settings: :func:`open_fs` for fsspec, :func:`arrow_fs` for
``pyarrow.fs`` (which, unlike boto, ignores ``AWS_ENDPOINT_URL``: the endpoint is passed to it
explicitly as ``endpoint_override``). A process sets its defaults once with :func:`configure`;
every :func:`open_fs` call without explicit options then uses them.

Buckets are never created. s3fs's ``makedirs`` creates a *bucket* that does not exist (so a typo'd
output bucket would appear wherever the credentials allow it); object stores have no folders to make,
so :func:`makedirs` makes folders only on filesystems that have them, and writing into a missing bucket
fails with ``NoSuchBucket``.

:func:`preflight` checks, before a command does any work, that its input can be read and its output
bucket exists and can be written (a short timeout and one retry, so an unreachable endpoint fails in
seconds), and turns what goes wrong into one line naming the URI and the cause: wrong credentials
(``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, 403), a missing bucket (``NoSuchBucket``), an
unreachable endpoint (connection refused, timeout). :func:`errors_named` does the same for a storage
error later in a run (credentials that expire half-way), naming the URI last opened.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class StorageConfig(BaseModel):
    """Where and how to reach object storage; unset fields fall back to the AWS environment variables."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = Field(None, description="the bucket's region (default AWS_REGION / AWS_DEFAULT_REGION)")
    key: str | None = Field(None, description="access key id")
    secret: SecretStr | None = Field(None, description="secret access key (never printed)")
    token: SecretStr | None = Field(None, description="session token (never printed)")
    anon: bool = Field(False, description="anonymous access to public buckets")
    options: dict[str, Any] = Field(default_factory=dict, description="extra fsspec storage options, passed as "
                                    "they are: plain values (text, numbers, true/false, null) or mappings of them, "
                                    "two levels deep (config_kwargs: {s3: {addressing_style: path}})")

    @field_validator("options")
    @classmethod
    def _plain_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_options(v)
        return v

    def resolved(self) -> StorageConfig:
        """This config with unset fields taken from the environment."""
        env = os.environ
        secret = self.secret or (SecretStr(env["AWS_SECRET_ACCESS_KEY"]) if env.get("AWS_SECRET_ACCESS_KEY") else None)
        token = self.token or (SecretStr(env["AWS_SESSION_TOKEN"]) if env.get("AWS_SESSION_TOKEN") else None)
        return self.model_copy(update={
            "endpoint_url": self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            "region": self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            "key": self.key or env.get("AWS_ACCESS_KEY_ID"), "secret": secret, "token": token})

    def describe(self) -> dict[str, Any]:
        """What is safe to log: the endpoint, region and whether credentials are set, never their values."""
        r = self.resolved()
        return {"endpoint_url": r.endpoint_url, "region": r.region, "anon": r.anon,
                "credentials": "set" if r.key and r.secret else "from the default AWS chain"}

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """Storage options for ``fsspec`` for a URI of ``protocol``."""
        if protocol not in ("s3", "s3a"):
            return dict(self.options)
        r = self.resolved()
        out: dict[str, Any] = {"anon": r.anon}
        if r.key and r.secret and not r.anon:
            out["key"], out["secret"] = r.key, r.secret.get_secret_value()
        if r.token and not r.anon:
            out["token"] = r.token.get_secret_value()
        if r.endpoint_url:
            out["endpoint_url"] = r.endpoint_url if "://" in r.endpoint_url else f"https://{r.endpoint_url}"
        if r.region:
            out["client_kwargs"] = {"region_name": r.region}
        return {**out, **self.options}


MAX_OPTIONS = 64  # keys in storage.options, at every level together
MAX_OPTION_TEXT = 4096  # characters of a key or a text value
MAX_OPTION_LEVELS = 2  # mappings inside storage.options: config_kwargs (botocore's Config) -> s3 -> a value


def check_options(options: dict[str, Any]) -> None:
    """``ValueError`` naming the key unless ``options`` holds plain values (str, int, float, bool, None) or
    mappings of them at most :data:`MAX_OPTION_LEVELS` deep, with at most :data:`MAX_OPTIONS` keys in all.

    Free-form options go to fsspec as they are, and fsspec keys its instance cache on ``str()`` of them: a list or
    a deeper structure could be an alias bomb's payload, and s3fs needs none (``client_kwargs``, ``config_kwargs``
    and ``s3_additional_kwargs`` are mappings; botocore's ``Config`` takes ``s3``, ``retries`` and ``proxies``
    as mappings of plain values: two levels). The walk stops at the first problem; a value is never repeated."""
    seen = 0
    todo: list[tuple[str, Any, int]] = [("storage.options", options, 0)]
    while todo:
        where, mapping, level = todo.pop()
        for key, value in mapping.items():
            seen += 1
            if seen > MAX_OPTIONS:
                raise ValueError(f"storage.options holds more than {MAX_OPTIONS} keys")
            if not isinstance(key, str) or len(key) > MAX_OPTION_TEXT:
                raise ValueError(f"{where}: a key is not text of at most {MAX_OPTION_TEXT} characters")
            name = f"{where}.{key}"
            if isinstance(value, dict):
                if level >= MAX_OPTION_LEVELS:
                    raise ValueError(f"{name}: a mapping {MAX_OPTION_LEVELS + 1} levels deep; storage options are "
                                     f"plain values or mappings of them, {MAX_OPTION_LEVELS} levels deep at most")
                todo.append((name, value, level + 1))
            elif isinstance(value, str):
                if len(value) > MAX_OPTION_TEXT:
                    raise ValueError(f"{name}: text longer than {MAX_OPTION_TEXT} characters")
            elif value is not None and not isinstance(value, (bool, int, float)):
                raise ValueError(f"{name}: a {type(value).__name__}; storage options are plain values (text, "
                                 "numbers, true/false, null) or mappings of them")


_DEFAULT = StorageConfig()


def configure(config: StorageConfig | None) -> None:
    """Set this process's storage defaults (what :func:`open_fs` uses when not given options)."""
    global _DEFAULT
    _DEFAULT = config or StorageConfig()


def current() -> StorageConfig:
    return _DEFAULT


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
_last_remote_uri: str | None = None  # what errors_named names when a storage error carries no URI


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an object store (buckets of keys, no real folders)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(_OBJECT_STORES.intersection(protocols))


def makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Make the folder ``path`` (and its parents) where folders exist; on an object store nothing: its
    folders are key prefixes, and s3fs's ``makedirs`` would create a missing *bucket*."""
    if not is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri``; the path is what the filesystem's methods take.

    Without ``storage_options`` the process defaults (:func:`configure`, then the environment) apply.
    """
    global _last_remote_uri
    uri = str(uri)
    if _protocol(uri) in _OBJECT_STORES:
        _last_remote_uri = uri
    opts = storage_options if storage_options is not None else _DEFAULT.fsspec_options(_protocol(uri))
    return url_to_fs(uri, **opts)


def arrow_fs(uri: str, config: StorageConfig | None = None) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``uri`` with the same settings as :func:`open_fs`."""
    import pyarrow.fs as pafs

    uri = str(uri)
    proto = _protocol(uri)
    if proto in ("s3", "s3a"):
        r = (config or _DEFAULT).resolved()
        kw: dict[str, Any] = {"anonymous": r.anon}
        if r.key and r.secret and not r.anon:
            kw.update(access_key=r.key, secret_key=r.secret.get_secret_value())
            if r.token:
                kw["session_token"] = r.token.get_secret_value()
        if r.region:
            kw["region"] = r.region
        if r.endpoint_url:
            url = r.endpoint_url if "://" in r.endpoint_url else f"https://{r.endpoint_url}"
            parsed = urlparse(url)
            kw["endpoint_override"] = parsed.netloc
            kw["scheme"] = parsed.scheme
        return pafs.S3FileSystem(**kw), uri.split("://", 1)[1]
    if proto == "file":
        return pafs.LocalFileSystem(), url_to_fs(uri)[1]
    fs, path = open_fs(uri, (config or _DEFAULT).fsspec_options(proto))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def absolute_uri(uri: str) -> str:
    """A local path (relative, absolute, ``~``, or ``file://``) as an absolute ``file://`` URI; any other URI
    (``s3://``, ``memory://`` ...) unchanged.

    Done on the driver before a run is planned: a relative path handed to Ray workers would be resolved
    against each worker's own folder (Ray's temporary working directory), and the same dataset spelled
    ``obs``, ``../obs`` and ``/abs/obs`` must be one dataset (one run id)."""
    from pathlib import Path

    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        return uri
    # not Path.as_uri(): fsspec takes a file:// path as it is, without percent-decoding it
    return "file://" + str(Path(uri.removeprefix("file://")).expanduser().resolve())


def local_path(uri: str) -> str:
    """The path of a ``file://`` URI (what users see and type); other URIs unchanged."""
    return str(uri).removeprefix("file://")


def join(uri: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and remote URIs alike)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def version_of(info: dict[str, Any]) -> str:
    """What identifies one version of a file, from its listing entry (``fs.info`` / ``fs.ls(detail=True)``): its
    size and its object store's ETag, else its modification time. A file rewritten in place, even to the same
    byte size, gets another version."""
    tag = (info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
           or info.get("last_modified") or info.get("created") or "")
    return f"{info.get('size')}/{tag}"


def write_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a torn one.

    Local files: write a temporary sibling, then rename. Object stores: a single PUT is atomic.
    """
    fs, path = open_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        makedirs(fs, parent)
    if _protocol(str(uri)) == "file":
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


# ---------------------------------------------------------------- checks and errors
class StorageError(OSError):
    """Object storage refused a request or cannot be reached; the message is one line: URI and cause."""


PREFLIGHT_TIMEOUT = 3.0  # seconds to connect (and one retry), so an unreachable endpoint fails in seconds


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__``, else an unsuppressed ``__context__``)."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not o for o in out):
        out.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return out


def _endpoint_of(exc: BaseException, config: StorageConfig | None) -> str:
    configured = (config or _DEFAULT).resolved().endpoint_url
    if configured:
        return configured
    url = str(getattr(exc, "kwargs", {}).get("endpoint_url") or "")
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}" if parsed.netloc else "the AWS S3 endpoint"


def describe_error(exc: BaseException, config: StorageConfig | None = None, bucket: str | None = None) -> str | None:
    """The cause of an object-store error in one line (what went wrong and what to check), or None when
    neither ``exc`` nor what caused it is a botocore error."""
    try:
        import botocore.exceptions as be
    except ImportError:  # no s3fs installed: no object-store errors either
        return None
    for e in _chain(exc):
        if isinstance(e, be.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return _client_cause(code, status, str(err.get("Message") or e), bucket)
        if isinstance(e, be.NoCredentialsError):
            return ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.key and "
                    "storage.secret), or storage.anon: true for a public bucket")
        if isinstance(e, (be.ConnectTimeoutError, be.ReadTimeoutError)):
            return (f"cannot reach the endpoint {_endpoint_of(e, config)} (timed out); check AWS_ENDPOINT_URL or "
                    "storage.endpoint_url, and the network")
        if isinstance(e, be.EndpointConnectionError):
            low = str(getattr(e, "kwargs", {}).get("error") or e).lower()
            why = ("connection refused" if "refused" in low or "connect call failed" in low else
                   "name not resolved" if "name" in low and ("resolv" in low or "known" in low) else
                   "cannot connect")
            return (f"cannot reach the endpoint {_endpoint_of(e, config)} ({why}); check AWS_ENDPOINT_URL or "
                    "storage.endpoint_url, and the network")
        if isinstance(e, be.BotoCoreError):
            return " ".join(str(e).split())
    return None


def _client_cause(code: str, status: int | None, message: str, bucket: str | None) -> str:
    if code == "InvalidAccessKeyId":
        return ("wrong credentials: the endpoint does not know this access key id (InvalidAccessKeyId); check "
                "AWS_ACCESS_KEY_ID or storage.key")
    if code == "SignatureDoesNotMatch":
        return ("wrong credentials: the secret key does not match the access key id (SignatureDoesNotMatch); check "
                "AWS_SECRET_ACCESS_KEY or storage.secret")
    if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken"):
        return f"the session token has expired or is invalid ({code}); renew the credentials (AWS_SESSION_TOKEN)"
    if code == "NoSuchBucket":
        return f"the bucket {bucket + ' ' if bucket else ''}does not exist (NoSuchBucket)"
    if code in ("AccessDenied", "AllAccessDisabled"):
        return f"access denied ({code}): these credentials may not do this; check the key's permissions on the bucket"
    if code == "403" or status == 403:  # a HEAD request: no body, so no error code to tell the two apart
        return ("access denied (403 Forbidden): wrong credentials, or credentials not allowed to do this; check "
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or storage.key, storage.secret) and the key's permissions")
    return f"{code or status}: {' '.join(message.split())}"


def _preflight_fs(config: StorageConfig, timeout: float) -> Any:
    """A fresh s3fs with the run's settings but a short connect timeout and one retry."""
    import s3fs

    opts = config.fsspec_options("s3")
    quick = {"connect_timeout": timeout, "read_timeout": 4 * timeout, "retries": {"max_attempts": 2,
                                                                                  "mode": "standard"}}
    opts["config_kwargs"] = {**quick, **opts.get("config_kwargs", {})}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.retries = 1  # s3fs's own retry loop on top of botocore's
    return fs


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key.strip("/")


def preflight(input_uri: str | None, output: str | None, config: StorageConfig | None = None,
              timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Before any work: on an object store (``s3://``), ``input_uri`` can be listed and read, and ``output``
    lies in an existing bucket that these credentials may write to (a zero-byte probe object under
    ``output`` is written and deleted). Raises :class:`~pipeline.untrusted.ConfigError` with one line naming
    the URI and the cause. Local and ``memory://`` URIs are left to the run. Never creates a bucket."""
    from pipeline.untrusted import ConfigError

    cfg = config or _DEFAULT
    checks = [(str(u), role) for u, role in ((input_uri, "input"), (output, "output"))
              if u and _protocol(str(u)) in ("s3", "s3a")]
    if not checks:
        return
    fs = _preflight_fs(cfg, timeout)
    for uri, role in checks:
        bucket, key = _bucket_key(uri)
        try:
            if role == "input":
                found = []
                for prefix in ([f"{key}/", key] if key else [""]):  # a folder, else a single object (an archive)
                    found = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1).get("Contents")
                    if found:
                        break
                if found:  # listing may be allowed where reading is not
                    fs.call_s3("head_object", Bucket=bucket, Key=found[0]["Key"])
            else:
                probe = f"{key}/.jointdiff-preflight-{uuid.uuid4().hex}" if key else \
                    f".jointdiff-preflight-{uuid.uuid4().hex}"
                fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"")
                try:
                    fs.call_s3("delete_object", Bucket=bucket, Key=probe)
                except Exception:  # allowed to write but not to delete: the empty probe stays, harmless
                    pass
        except Exception as exc:
            cause = describe_error(exc, cfg, f"'{bucket}'")
            if cause is None:
                raise
            if "NoSuchBucket" in cause and role == "output":
                cause += "; jointdiff does not create buckets: create it first, or fix the name"
            action = "cannot read the input" if role == "input" else "cannot write the output"
            raise ConfigError(f"{uri}: {action}: {cause}") from None


@contextmanager
def errors_named() -> Iterator[None]:
    """Turn an object-store error (botocore's own, or s3fs's ``OSError`` made from one) raised in the block
    into a :class:`StorageError` of one line: the object-store URI opened last in this process (the one
    being read or written) and the cause. Other exceptions pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        botocore_own = type(exc).__module__.startswith("botocore")
        bucket = _bucket_key(_last_remote_uri)[0] if _last_remote_uri else None
        cause = describe_error(exc, bucket=f"'{bucket}'" if bucket else None) \
            if isinstance(exc, OSError) or botocore_own else None
        if cause is None:
            raise
        raise StorageError(f"{_last_remote_uri or 'object storage'}: {cause}") from exc
