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
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field, SecretStr


class StorageConfig(BaseModel):
    """Where and how to reach object storage; unset fields fall back to the AWS environment variables."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = None
    key: str | None = Field(None, description="access key id")
    secret: SecretStr | None = Field(None, description="secret access key (never printed)")
    token: SecretStr | None = Field(None, description="session token (never printed)")
    anon: bool = Field(False, description="anonymous access to public buckets")
    options: dict[str, Any] = Field(default_factory=dict, description="extra fsspec storage options, as is")

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


_DEFAULT = StorageConfig()


def configure(config: StorageConfig | None) -> None:
    """Set this process's storage defaults (what :func:`open_fs` uses when not given options)."""
    global _DEFAULT
    _DEFAULT = config or StorageConfig()


def current() -> StorageConfig:
    return _DEFAULT


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri``; the path is what the filesystem's methods take.

    Without ``storage_options`` the process defaults (:func:`configure`, then the environment) apply.
    """
    uri = str(uri)
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


def write_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a torn one.

    Local files: write a temporary sibling, then rename. Object stores: a single PUT is atomic.
    """
    fs, path = open_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    if _protocol(str(uri)) == "file":
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
