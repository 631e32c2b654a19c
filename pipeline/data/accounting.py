"""The shard plan of a run and its accounting: every input row once, in cleaned or in errors.

A run lives under ``<output>/runs/<run_id>/`` (docs/concepts/architecture.md). Each source shard, once all its outputs
are written, gets a completion marker ``_done/<shard>.json`` (written last, atomically) that records
the version of the input shard it was made from (size and ETag, else modification time:
:func:`~pipeline.data.storage.version_of`). The plan lists the input's shards in a stable order and
marks those complete for the version there now, so a re-run with the same run id does only the rest,
and a shard rewritten since (even to the same byte size) is cleaned again.

:func:`check_run` then proves that every input row ``(shard, row)`` of the run's plan appears exactly
once: in ``metrics/`` (the cleaned rows, with their shard and row) or in ``errors/``. A shard that
cannot be read at all is accounted for by one error row with ``row = -1``. The plan is the one the run
started with: a shard that lands during the run is for the next run, and a shard removed from the
input after it was cleaned (retention) leaves its outputs in place, reported as *orphaned*, not as an
error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.data.shards import list_parts, list_shard_infos, read_table
from pipeline.data.storage import join, open_fs, version_of, write_atomic


class AccountingError(RuntimeError):
    """Some input rows are missing from a run's outputs, or appear more than once."""


class RejectedRowsError(RuntimeError):
    """A run rejected more than ``max_rejected_fraction`` of its input rows, or cleaned none (exit code 4).

    Raised after the run is complete (:meth:`pipeline.run.Run.judge`): its outputs, accounting and
    summary row are written; ``summary`` is that row. The message groups the reasons."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class PlannedShard:
    uri: str
    name: str
    done: bool
    size: int  # bytes of the input shard
    version: str = ""  # size + ETag or mtime (storage.version_of), kept in its marker: a rewritten shard is redone


def marker_uri(run_uri: str, shard: str) -> str:
    return join(run_uri, "_done", shard.replace(".parquet", ".json"))


def _marker_matches(marker: dict[str, Any], version: str, size: int, marker_info: dict[str, Any],
                    shard_info: dict[str, Any]) -> bool:
    """Whether a completion marker was written for the input shard as it is now."""
    if "input_version" in marker:
        return marker["input_version"] == version
    # a marker of an earlier jointdiff records only the size: it stands if the shard was not modified after it
    mtime = _mtime(shard_info)
    return marker.get("input_size") == size and mtime is not None and mtime <= (_mtime(marker_info) or 0)


def _mtime(info: dict[str, Any]) -> float | None:
    t = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if t is None:
        return None
    return float(t.timestamp()) if hasattr(t, "timestamp") else float(t)


def plan(input_uri: str, run_uri: str) -> list[PlannedShard]:
    """The input's shards in a stable (sorted) order; ``done`` where the run's marker exists and was
    written for the input shard's current version (a shard replaced since, even by one of the same size,
    is planned again)."""
    fs, root = open_fs(join(run_uri, "_done"))
    fs.invalidate_cache(root)
    markers = {str(i["name"]).rsplit("/", 1)[-1]: i for i in fs.ls(root, detail=True)} if fs.exists(root) else {}
    out = []
    for uri, info in list_shard_infos(input_uri):
        name = uri.rsplit("/", 1)[-1]
        size, version = int(info.get("size") or 0), version_of(info)
        done = False
        marker = markers.get(name.replace(".parquet", ".json"))
        if marker is not None:
            try:
                done = _marker_matches(json.loads(fs.cat_file(marker["name"])), version, size, marker, info)
            except Exception:
                done = False  # a torn or foreign marker: redo the shard
        out.append(PlannedShard(uri, name, done, size, version))
    return out


def mark_done(run_uri: str, shard: str, info: dict[str, Any]) -> None:
    """Write the shard's completion marker: last, after all of its outputs, and atomically."""
    write_atomic(marker_uri(run_uri, shard), json.dumps(info, sort_keys=True).encode())


def input_rows(shard_uri: str) -> int | None:
    """Row count from the Parquet footer (None if the file cannot be read as Parquet)."""
    fs, path = open_fs(shard_uri)
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:
        return None


@dataclass
class Accounting:
    inputs: int = 0
    cleaned: int = 0
    errors: int = 0
    missing: list[tuple[str, int]] = field(default_factory=list)
    duplicated: list[tuple[str, int, int]] = field(default_factory=list)  # (shard, row, times)
    unexpected: list[tuple[str, int]] = field(default_factory=list)  # rows that no input has
    duplicate_ids: list[tuple[str, int]] = field(default_factory=list)  # (id, times) among the cleaned rows
    orphaned: dict[str, int] = field(default_factory=dict)  # shard -> output rows, for shards no longer in the input

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected or self.duplicate_ids)

    def describe(self, limit: int = 10) -> str:
        if self.ok:
            return f"accounting ok: {self.inputs} input rows = {self.cleaned} cleaned + {self.errors} errors" + \
                (f"; {self.describe_orphaned(limit)}" if self.orphaned else "")
        parts = []
        for label, items in (("missing", self.missing), ("duplicated", self.duplicated),
                             ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(f"{i[0]} row {i[1]}" + (f" x{i[2]}" if len(i) > 2 else "") for i in items[:limit])
                more = f" and {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: {shown}{more}")
        if self.duplicate_ids:
            shown = ", ".join(f"{i!r} x{c}" for i, c in self.duplicate_ids[:limit])
            parts.append(f"{len(self.duplicate_ids)} id(s) cleaned more than once: {shown}")
        return f"accounting FAILED for {self.inputs} input rows: " + "; ".join(parts)

    def describe_orphaned(self, limit: int = 10) -> str:
        """One line on the outputs of shards that the input no longer has (kept, not counted)."""
        names = sorted(self.orphaned)
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        return (f"{len(names)} shard(s) no longer in the input keep their outputs ({sum(self.orphaned.values())} "
                f"row(s), orphaned, not counted): {shown}")


def _rows(run_uri: str, sub: str, with_ids: bool = False) -> tuple[list[tuple[str, int]], list[str | None]]:
    rows: list[tuple[str, int]] = []
    ids: list[str | None] = []
    for part in list_parts(join(run_uri, sub)):
        t = read_table(part, ["shard", "row", "id"] if with_ids else ["shard", "row"], attempts=3)
        rows.extend(zip(t.column("shard").to_pylist(), t.column("row").to_pylist()))
        if with_ids:
            ids.extend(t.column("id").to_pylist())
    return rows, ids


def _exists(uri: str) -> bool:
    fs, path = open_fs(uri)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return bool(fs.exists(path))


def check_run(input_uri: str, run_uri: str, shards: list[PlannedShard] | None = None) -> Accounting:
    """Every input row ``(shard, row)`` exactly once in the run's metrics (cleaned) or errors, and no
    id cleaned twice.

    ``shards`` is the run's plan (:func:`plan` at its start); without it, the input's shards now. Rows of
    shards outside the plan are *orphaned* (a shard removed from the input after it was cleaned: its
    outputs stay, reported, not counted); a shard that landed in the input after the plan is not expected
    (it is for the next run). An error row with ``row = -1`` stands for its whole shard (one the cleaner
    could not read).
    """
    acc = Accounting()
    expected: dict[tuple[str, int], int] = {}
    rows_of: dict[str, int] = {}
    uris = [s.uri for s in shards] if shards is not None else [u for u, _ in list_shard_infos(input_uri)]
    for uri in uris:
        name = uri.rsplit("/", 1)[-1]
        n = input_rows(uri)
        if n is None and shards is not None and not _exists(uri):
            continue  # removed from the input during the run (retention): its outputs, if any, are orphaned
        if n is None:  # not even a Parquet footer: the shard is one unit, accounted by its row -1
            expected[(name, -1)] = 0
            rows_of.setdefault(name, -1)
            acc.inputs += 1
            continue
        rows_of[name] = n
        acc.inputs += n
        for r in range(n):
            expected[(name, r)] = 0
    cleaned, cleaned_ids = _rows(run_uri, "metrics", with_ids=True)
    errors, _ = _rows(run_uri, "errors")
    planned = [(k, i) for k, i in zip(cleaned, cleaned_ids) if k[0] in rows_of]
    for shard, _ in [*cleaned, *errors]:
        if shard not in rows_of:
            acc.orphaned[shard] = acc.orphaned.get(shard, 0) + 1
    cleaned = [k for k, _ in planned]
    errors = [k for k in errors if k[0] in rows_of]
    acc.cleaned, acc.errors = len(cleaned), len(errors)
    acc.duplicate_ids = sorted((i, c) for i, c in Counter(i for _, i in planned).items() if c > 1)
    for (shard, row), count in Counter(cleaned + errors).items():
        if row == -1 and rows_of.get(shard, -1) >= 0:  # a footer that reads over data that does not: every row
            for r in range(rows_of[shard]):
                expected[(shard, r)] += count
        elif (shard, row) in expected:
            expected[(shard, row)] += count
        else:
            acc.unexpected.append((shard, row))
    acc.missing = sorted(k for k, c in expected.items() if c == 0)
    acc.duplicated = sorted((k[0], k[1], c) for k, c in expected.items() if c > 1)
    acc.unexpected.sort()
    return acc
