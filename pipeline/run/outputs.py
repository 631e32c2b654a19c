"""A shard's outputs: encoded into the three tables of the data contracts (docs/concepts/outputs.md), and written.

Under ``<output>/runs/<run_id>/``, per source shard:

* ``cleaned/<shard>``: ``id, denoised, noise_estimate[, uncertainty]`` (16-bit PNG), the metric columns,
  ``alpha_hat`` (the forward weight the image was cleaned with: estimated under ``forward.alpha: auto``),
  ``run_id, model_ids`` (the pinned models, ``URI@sha256:PREFIX+URI@sha256:PREFIX``, then ``+`` the supervised
  network's under ``sampler.path`` fast / routed), ``sampler`` (JSON), ``path`` and ``route_score`` (what cleaned
  the row, :func:`_path_cols`), ``nfe, seconds``;
* ``metrics/run_id=<run_id>/<shard>``: one row per image for dashboards (Hive-partitioned by run id), with
  ``alpha`` (the weight given, null where none was), ``alpha_hat`` and ``alpha_error`` (``|alpha_hat - alpha|``
  where the weight was estimated and a given one is known), ``path`` and ``route_score``;
* ``errors/<shard>``: one row per rejected input row (``run_id, dataset, shard, row, id, stage, reason``).

Files are named by source shard, so redoing a shard replaces rather than duplicates. A folder holds a shard's
file only when the shard has rows for it (a run that rejected nothing has no ``errors/`` files, a shard whose
every row was rejected no ``cleaned/`` or ``metrics/`` file): a zero-row Parquet file breaks Hugging Face
``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.data.shards import build_table, write_table
from pipeline.data.storage import join, open_fs
from pipeline.data.validate import ERRORS_SCHEMA

METRIC_COLUMNS = ("psnr", "ssim", "psnr_input", "ssim_input", "residual", "spread", "removed_energy")


@dataclass
class ShardResult:
    """What a shard's work produced: the cleaned rows as columns (``row, id, denoised, noise_estimate,
    [uncertainty,] metrics, alpha, seconds, nfe, started_at``) and the error rows."""

    cleaned: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **values: Any) -> None:
        for k, v in values.items():
            self.cleaned.setdefault(k, []).append(v)

    @property
    def n_cleaned(self) -> int:
        return len(self.cleaned.get("id", []))


@dataclass
class ShardTables:
    cleaned: pa.Table
    metrics: pa.Table  # without its run_id column: the Hive partition folder holds it
    errors: pa.Table


def encode(result: ShardResult, run_id: str, dataset: str, shard: str, model_ids: str, sampler: str,
           uncertainty: bool) -> ShardTables:
    """The shard's three tables; the images as 16-bit PNG (``uncertainty``: the posterior spread image too)."""
    c = result.cleaned
    n = result.n_cleaned
    metric_cols = {m: pa.array(c.get(m, []), pa.float64()) for m in METRIC_COLUMNS}
    image_cols = ["denoised", "noise_estimate"] + (["uncertainty"] if uncertainty else [])
    images = {k: c.get(k, []) for k in image_cols}  # present even when every row was rejected
    extra = {**metric_cols, "run_id": pa.array([run_id] * n, pa.string()),
             "model_ids": pa.array([model_ids] * n, pa.string()), "sampler": pa.array([sampler] * n, pa.string()),
             "alpha_hat": pa.array(c.get("alpha_hat", []), pa.float32()), **_path_cols(c, n),
             "nfe": pa.array(c.get("nfe", []), pa.int32()), "seconds": pa.array(c.get("seconds", []), pa.float64())}
    cleaned = build_table(c.get("id", []), images, bits={k: 16 for k in images}, extra=extra)
    metrics = pa.table({
        "started_at": pa.array(c.get("started_at", []), pa.timestamp("s", tz="UTC")),
        "dataset": pa.array([dataset] * n, pa.string()), "shard": pa.array([shard] * n, pa.string()),
        "row": pa.array(c.get("row", []), pa.int64()), "id": pa.array(c.get("id", []), pa.string()),
        **metric_cols, "alpha": pa.array(c.get("alpha", []), pa.float32()),
        "alpha_hat": pa.array(c.get("alpha_hat", []), pa.float32()),
        "alpha_error": pa.array(c.get("alpha_error", []), pa.float32()), **_path_cols(c, n),
        "nfe": pa.array(c.get("nfe", []), pa.int32()), "seconds": pa.array(c.get("seconds", []), pa.float64()),
    })
    return ShardTables(cleaned, metrics, pa.Table.from_pylist(result.errors, schema=ERRORS_SCHEMA))


def _path_cols(c: dict[str, list[Any]], n: int) -> dict[str, pa.Array]:
    """``path`` (what cleaned the row: ``joint``, or under ``sampler.path`` fast / routed ``fast`` or ``joint``)
    and ``route_score`` (the router's score, null where none was computed)."""
    return {"path": pa.array(c.get("path", ["joint"] * n), pa.string()),
            "route_score": pa.array(c.get("route_score", [None] * n), pa.float64())}


def write(run_uri: str, run_id: str, shard: str, tables: ShardTables) -> None:
    """Write (or, for an empty table, remove) the shard's cleaned, metrics and errors files."""
    _write_rows(join(run_uri, "cleaned", shard), tables.cleaned)
    _write_rows(join(run_uri, "metrics", f"run_id={run_id}", shard), tables.metrics)
    _write_rows(join(run_uri, "errors", shard), tables.errors)


def _write_rows(uri: str, table: pa.Table) -> None:
    """Write ``table`` to ``uri``, or, when it has no row, make sure no file is there: a zero-row Parquet
    file breaks Hugging Face ``datasets`` (``BatchSize must be greater than 0``), and a file left by an
    earlier attempt at the shard (a redone shard that now has no row for this folder) would be stale."""
    if table.num_rows:
        write_table(uri, table)
        return
    fs, path = open_fs(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
