"""``jointdiff ingest SRC DST``: a folder, tar or zip of images on any URI -> observation shards.

Inputs are listed in a stable order (:mod:`pipeline.data.sources`: a folder's and a zip's sorted by
path, a tar's in archive order) and cut into shards of ``shard_size`` inputs; input ``k`` of the listing
always lands in shard ``k // shard_size``, so re-running over the same source writes the same shards.
The id of an image is its path relative to ``SRC`` (inside the archive for a tar or zip). Each input
ends up in exactly one place:

* ``DST/shard-NNNNN.parquet``: ``id, observation`` (16-bit PNG by default), for inputs that decode
  and pass the :class:`~pipeline.data.validate.ImagePolicy`;
* ``DST/_errors/shard-NNNNN.parquet``: ``run_id, dataset, shard, row, id, stage, reason`` for the
  others (``dataset`` is ``SRC``, ``row`` the input's index within its shard): files that cannot be
  decoded or do not pass the policy, and entries refused unread (a link out of ``SRC``, an archive
  member whose path leaves the archive or that is a link or device, a file over ``policy.max_bytes``);
* ``DST/_done/shard-NNNNN.json``: the completion marker, written last and atomically. A re-run skips
  shards whose marker is present and matches the inputs (each input's path and version: size and
  ETag, mtime or CRC), so it resumes an interrupted ingest; delete a marker to redo that shard.

Hidden names (``.DS_Store``) are not inputs; the summary counts them under ``hidden``. One input costs
at most about ``policy.max_bytes`` of memory, whatever the size of the file or the archive: sources are
read one input at a time, a tar as a stream (twice when shards are to be written: once for the headers,
which plan the shards, once for the members of the shards still to do).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.accounting import mark_done, marker_uri
from pipeline.data.shards import SHARD_PATTERN, build_table, read_table, write_table
from pipeline.data.sources import Source, SourceReader, open_source
from pipeline.data.storage import StorageConfig, join, open_fs, preflight
from pipeline.data.validate import (
    ERRORS_SCHEMA,
    SOURCE_COLUMNS,
    ImagePolicy,
    RowError,
    conform,
    decode_any,
    error_row,
    source_info,
)
from pipeline.untrusted import printable


class IngestConfig(BaseModel):
    """``jointdiff ingest``: how to turn image files into observation shards."""

    model_config = ConfigDict(extra="forbid")

    policy: ImagePolicy = Field(default_factory=ImagePolicy)
    shard_size: int = Field(1000, ge=1, description="inputs per shard, at most")
    shard_bytes: int = Field(256 * 2**20, ge=1, description="input bytes per shard, at most (from the listing; a "
                                                            "larger file is a shard of its own)")
    bits: int = Field(16, description="PNG bit depth of the observation column (8 or 16)")
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
                                                           ".webp", ".npy"],
                                  description="file name endings read as images (any case); a file with another "
                                              "ending is a row of the errors table")
    storage: StorageConfig = Field(default_factory=StorageConfig)


def ingest_id(src: str, cfg: IngestConfig) -> str:
    key = json.dumps({"src": str(src).rstrip("/"), "policy": cfg.policy.identity(), "bits": cfg.bits,
                      "extensions": cfg.extensions}, sort_keys=True)
    return "ingest-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _fingerprint(sources: list[Source], run_id: str) -> str:
    """What a shard was made from: the ingest settings and each input's path and version."""
    return hashlib.sha256("\n".join([run_id] + [f"{s.id}\t{s.version}" for s in sources]).encode()).hexdigest()


def _read_marker(dst: str, shard: str) -> dict[str, Any] | None:
    fs, path = open_fs(marker_uri(dst, shard))
    try:
        return json.loads(fs.cat_file(path))
    except Exception:
        return None  # absent or torn: the shard is redone


def _read_one(reader: SourceReader, source: Source, cfg: IngestConfig) -> tuple[Any, dict[str, Any]]:
    """The image under the policy, and what the source was (:func:`pipeline.data.validate.source_info`)."""
    ext = "." + source.id.rsplit(".", 1)[-1].lower() if "." in source.id.rsplit("/", 1)[-1] else ""
    if ext not in cfg.extensions:
        raise RowError("decode", f"unsupported file type {ext or '(no extension)'}; ingest reads "
                                 f"{', '.join(cfg.extensions)}")
    data = reader.read(source, cfg.policy)
    arr = decode_any(data, source.id, cfg.policy.decode_pixels, cfg.policy.max_bytes)
    return conform(arr, cfg.policy), source_info(data, arr)


def iter_shard_plan(sources: list[Source], shard_size: int,
                    shard_bytes: int | None = None) -> Iterator[tuple[int, str, list[Source]]]:
    """The listing cut into shards of at most ``shard_size`` inputs and ``shard_bytes`` listed bytes (a file
    larger than that alone), in listing order: the same listing always gives the same shards."""
    k, chunk, size = 0, [], 0
    for s in sources:
        b = s.size or 0
        if chunk and (len(chunk) >= shard_size or (shard_bytes is not None and size + b > shard_bytes)):
            yield k, SHARD_PATTERN.format(k), chunk
            k, chunk, size = k + 1, [], 0
        chunk.append(s)
        size += b
    if chunk:
        yield k, SHARD_PATTERN.format(k), chunk


def ingest(src: str, dst: str, cfg: IngestConfig | None = None, progress: bool = True,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ingest ``src`` into ``dst``; returns counts and which shards were written or skipped."""
    cfg = cfg or IngestConfig()
    if cfg.bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {cfg.bits}")
    run_id = ingest_id(src, cfg)
    preflight(src, dst)  # SRC readable, DST's bucket there and writable: one line if not, before any work
    with open_source(src) as reader:
        counts = _ingest(reader, src, dst, cfg, run_id, progress, log)
    counts["removed"] = _remove_stale(dst, counts.pop("shards"))
    return counts


def _ingest(reader: SourceReader, src: str, dst: str, cfg: IngestConfig, run_id: str, progress: bool,
            log: Callable[[str], None] | None) -> dict[str, Any]:
    from tqdm import tqdm

    sources = reader.sources
    if not sources:
        raise FileNotFoundError(f"{src}: no files to ingest" + (f" ({reader.hidden} hidden name(s), which are not "
                                                                 "inputs)" if reader.hidden else ""))
    counts: dict[str, Any] = {"run_id": run_id, "inputs": len(sources), "ingested": 0, "errors": 0,
                              "hidden": reader.hidden, "written": [], "skipped": []}
    seen: set[str] = set()
    with tqdm(total=len(sources), desc=f"ingest {src}", unit="file", disable=not progress) as bar:
        plan = list(iter_shard_plan(sources, cfg.shard_size, cfg.shard_bytes))
        counts["shards"] = len(plan)
        for _, shard, chunk in plan:
            fp = _fingerprint(chunk, run_id)
            done = _read_marker(dst, shard)
            if done is not None and done.get("fingerprint") == fp:
                seen.update(read_table(join(dst, shard), ["id"]).column("id").to_pylist())
                counts["ingested"] += done["rows"]
                counts["errors"] += done["errors"]
                counts["skipped"].append(shard)
                bar.update(len(chunk))
                continue
            ids, images, errors, infos = [], [], [], []
            for row, source in enumerate(chunk):
                try:
                    if source.refused:  # refused from the listing (a link out of SRC...), whatever its name says
                        raise RowError("read", source.refused)
                    if source.id in seen:
                        raise RowError("validate", f"duplicate id {source.id!r} (an earlier input has the same path)")
                    img, info = _read_one(reader, source, cfg)
                    seen.add(source.id)
                    ids.append(source.id)
                    images.append(img)
                    infos.append(info)
                except RowError as exc:
                    errors.append(error_row(run_id, str(src).rstrip("/"), shard, row, source.id, exc.stage,
                                            exc.reason))
                bar.update(1)
            table = build_table(ids, {"observation": images}, bits={"observation": cfg.bits},
                                extra={k: pa.array([i[k] for i in infos], t) for k, t in SOURCE_COLUMNS.items()})
            write_table(join(dst, shard), table)
            write_table(join(dst, "_errors", shard), pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
            mark_done(dst, shard, {"fingerprint": fp, "rows": len(ids), "errors": len(errors), "run_id": run_id})
            counts["ingested"] += len(ids)
            counts["errors"] += len(errors)
            counts["written"].append(shard)
            if log is not None:
                for e in errors:
                    log(f"{shard} row {e['row']} ({printable(e['id'])}): {e['stage']}: {e['reason']}")
    return counts


def _remove_stale(dst: str, n_shards: int) -> list[str]:
    """Drop shards (and their errors and markers) left by an earlier ingest of a larger source or with
    a smaller shard size: their index is past this plan's last shard."""
    fs, root = open_fs(dst)
    removed = []
    for sub, suffix in (("", ".parquet"), ("_errors", ".parquet"), ("_done", ".json")):
        folder = f"{root.rstrip('/')}/{sub}" if sub else root.rstrip("/")
        if not fs.exists(folder):
            continue
        for p in fs.ls(folder, detail=False):
            name = p.rsplit("/", 1)[-1]
            if name.startswith("shard-") and name.endswith(suffix) and name[6:-len(suffix)].isdigit() \
                    and int(name[6:-len(suffix)]) >= n_shards:
                fs.rm_file(p)
                removed.append(f"{sub}/{name}" if sub else name)
    return sorted(removed)
