"""Resolve a ``DataConfig`` to images: an embedded dataset name or a URI of image shards.

Which column of a shard dataset holds the images: the one named, else ``image`` (an images dataset,
docs/concepts/outputs.md), else ``observation`` when the shards have no ``clean`` column: what ``jointdiff ingest``
writes from a folder of photos, so an ingested folder can train a prior or be corrupted into a test
set as it is. A dataset with both ``observation`` and ``clean`` (a test set with its truth) is
ambiguous, so the column must be named; so must any other image column.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.data.embedded import NAMES, ImageSet, load_embedded
from pipeline.data.shards import list_shards, read_images
from pipeline.data.validate import ImagePolicy, RowError, conform


def shard_columns(source: str) -> list[str]:
    """The column names of the dataset's first shard (of ``source`` itself when it is one shard)."""
    import pyarrow.parquet as pq

    from pipeline.data.shards import ShardError
    from pipeline.data.storage import open_fs

    first = source if str(source).endswith(".parquet") else list_shards(source)[0]
    fs, path = open_fs(first)
    try:
        with fs.open(path, "rb") as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    except Exception as exc:
        raise ShardError(f"{first}: cannot read Parquet ({exc})") from None


def image_column(source: str, column: str | None = None, column_key: str | None = "data.column") -> str:
    """The column to read images from (see the module docstring); a :class:`~pipeline.untrusted.ConfigError`
    naming the columns found, and the ``--set column_key=...`` that picks one, when there is none."""
    from pipeline.untrusted import ConfigError

    names = shard_columns(source)
    how = (f"; name it with --set {column_key}=COLUMN" if column_key else
           "; give a dataset with an 'image' column (or 'observation', as `jointdiff ingest` writes)")
    if column is not None:
        if column not in names:
            raise ConfigError(f"{source}: no column '{column}' (the shards have {', '.join(names)})"
                              + (f"; set {column_key} to one of them" if column_key else ""))
        return column
    if "image" in names:
        return "image"
    if "observation" in names and "clean" not in names:
        return "observation"
    if "observation" in names:
        raise ConfigError(f"{source}: which images? the shards have 'observation' and 'clean' (corrupted images "
                          f"and their truth) and no 'image' column"
                          + (f"; choose one with --set {column_key}=clean or --set {column_key}=observation"
                             if column_key else "; give the clean images alone (e.g. the dataset you corrupted)"))
    raise ConfigError(f"{source}: no image column: the shards have {', '.join(names)}{how}")


def load_images(source: str, split: str = "train", size: int | None = 32, channels: int = 1,
                column: str | None = None, column_key: str | None = "data.column", n: int | None = None,
                on_bad: Callable[[ValueError], None] | None = None) -> ImageSet:
    """Images in [0, 1], (N, C, size, size); ``size=None``: each at its own size, a list of (C, H, W).
    ``source`` is an embedded name or a shard URI; ``column`` its image column (default:
    :func:`image_column`'s choice); ``column_key`` the config key that names the column, for the error
    message (None: the caller has none); ``n``: only the first ``n`` images that decode. A row that does not
    decode or conform raises a ``ValueError`` naming it, or with ``on_bad`` is passed to it and left out."""
    if source in NAMES:
        return load_embedded(source, split, size, channels, n=n)
    column = image_column(source, column, column_key)
    ids, arrays = read_images(source, column, limit=n, on_bad=on_bad)
    # training images: resized to size (or kept), alpha dropped, channels converted; non-finite is an error
    policy = ImagePolicy(size=size, channels=channels, resize="resize", alpha="drop", max_pixels=2**62)
    kept, out = [], []
    for id_, arr in zip(ids, arrays):
        try:
            out.append(conform(arr, policy))
            kept.append(id_)
        except RowError as exc:
            bad = ValueError(f"{source}: image {id_!r}: {exc.reason}")
            if on_bad is None:
                raise bad from None
            on_bad(bad)
    if size is not None and not out:
        raise ValueError(f"{source}: no image to load in column '{column}' (none there, or none decodes)")
    return ImageSet(kept, out if size is None else np.stack(out))
