"""One way to reach any fsspec URI (``file://``, plain paths, ``memory://``, ``s3://`` ...)."""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import url_to_fs


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri``; the path is what the filesystem's methods take."""
    return url_to_fs(str(uri), **(storage_options or {}))


def join(uri: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and remote URIs alike)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out
