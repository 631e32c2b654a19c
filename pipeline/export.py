"""Cleaned images out of a run, as PNG files (``jointdiff export RUN DIR``).

A run keeps its images inside Parquet (``cleaned/<shard>``: 16-bit PNG structs); this writes each
cleaned image as its own file, for people and tools that want files.

* **Which run.** ``RUN`` is a run folder (``OUTPUT/runs/RUN_ID``) or an output root (then its only
  run, the one named by ``run_id``, or else the newest: the one whose latest summary row finished last,
  or for runs without one, whose last file was written last). :func:`resolve_run` says which it took.
* **Names.** Each file is named after its row id less an image file's extension (``cat.jpg`` becomes
  ``cat.png``, unless two ids of the run would then meet, ignoring case, or one would meet another id: those keep
  their whole id), made safe by :func:`pipeline.untrusted.safe_names` (the escaping that also names the ``path`` of
  every stored image struct): path separators and
  ``..`` replaced by ``_``, a leading dot too (no hidden file), control characters escaped as ``%XX``,
  at most :data:`MAX_NAME_BYTES` bytes with the ``.png`` suffix; ids that come out the same get
  ``~`` and a short hash of their raw id appended. ``DIR/export.csv`` maps each file to its id (and
  source shard and row). Files are written only inside ``DIR``: ``DIR/<name>.png`` and, with
  ``noise``, ``DIR/noise/<name>.png``; each through a temporary file and a rename, so a link at the
  target is replaced, never followed.
* **Bit depth.** The source's: an image whose observation (in the run's input shard) is an 8-bit PNG
  (or less), or was ingested from an 8-bit file (its ``source_bits``; ingest stores 16-bit PNG), is written as
  8-bit PNG, a 16-bit one (or a float ``.npy``) as 16-bit. ``cleaned/`` stores
  16-bit PNG, so 16-bit output is those bytes as they are; 8-bit output is rounded to the nearest
  level. When the input cannot be read from here, images are written at 16 bits and the result says so.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.data.shards import (
    MissingColumnError,
    decode_image,
    encode_png,
    from_float,
    list_parts,
    read_table,
    to_float,
)
from pipeline.data.storage import join, open_fs, write_atomic
from pipeline.untrusted import MAX_NAME_BYTES as MAX_NAME_BYTES  # re-exported: the names' limit
from pipeline.untrusted import check_run_id, is_plain_name, safe_names

SUFFIX = ".png"
CSV_NAME = "export.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".npy")  # dropped from names


def file_names(ids: list[str]) -> dict[str, str]:
    """Each id's PNG file name: the id less an image file's extension (:data:`IMAGE_EXTENSIONS`, any case) where
    that meets no other id of ``ids`` and no other id's shortened form, else the whole id; made safe by
    :func:`pipeline.untrusted.safe_names`."""
    unique = list(dict.fromkeys(str(i) for i in ids))
    short = {i: i[:i.rfind(".")] if i.lower().endswith(IMAGE_EXTENSIONS) and i.rfind(".") > 0 else i for i in unique}
    met = Counter(v.casefold() for v in short.values())  # a.jpg and A.png would be one file where case is ignored
    raw = {i.casefold() for i in unique}
    keys = [short[i] if met[short[i].casefold()] == 1 and (short[i] == i or short[i].casefold() not in raw) else i
            for i in unique]
    return dict(zip(unique, safe_names(keys, SUFFIX)))


class ExportError(FileNotFoundError):
    """RUN is neither a run folder nor an output root holding runs (one line: the path and what was expected)."""


# ---------------------------------------------------------------- which run
def _is_run(fs: Any, path: str) -> bool:
    return any(fs.exists(f"{path}/{sub}") for sub in ("cleaned", "metrics", "errors", "_done"))


def _last_written(fs: Any, path: str) -> float:
    """The newest modification time (epoch seconds) of the files under a run folder; 0 when unknown."""
    newest = 0.0
    for p in fs.find(path):
        try:
            newest = max(newest, fs.modified(p).timestamp())
        except Exception:  # a store that keeps no times
            continue
    return newest


def resolve_run(uri: str, run_id: str | None = None) -> tuple[str, str]:
    """The run folder that ``uri`` names, and a note on how it was chosen (empty for a run folder).

    ``uri`` is a run folder, or an output root holding ``runs/``: its only run, ``run_id``, or else
    the newest (latest summary row; runs without one by their files' times). :class:`ExportError`
    (one line naming the path and what it should be) otherwise; a ``run_id`` that is not a run id
    (:func:`pipeline.untrusted.check_run_id`), :class:`~pipeline.untrusted.ConfigError`."""
    if run_id is not None:
        check_run_id(run_id, "run_id")  # a name under runs/, never a path (ConfigError)
    uri = str(uri).rstrip("/")
    fs, path = open_fs(uri)
    if not fs.exists(path):
        raise ExportError(f"{uri}: no such folder; RUN is a run folder (OUTPUT/runs/RUN_ID) or an output root "
                          "holding runs/")
    if run_id is None and _is_run(fs, path):
        return uri, ""
    runs_path = f"{path.rstrip('/')}/runs"
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(runs_path, detail=False)
                   if fs.isdir(p)) if fs.exists(runs_path) else []
    names = [n for n in names if _is_run(fs, f"{runs_path}/{n}")]
    if run_id is not None:
        if run_id not in names:
            where = f"its runs are {', '.join(names)}" if names else "it holds no run"
            raise ExportError(f"{uri}: no run {run_id!r} under runs/ ({where}); give an output root and one of "
                              "its run ids, or the run folder itself")
        return join(uri, "runs", run_id), f"run {run_id}"
    if not names:
        raise ExportError(f"{uri}: not a run folder (OUTPUT/runs/RUN_ID holding cleaned/, metrics/, errors/ or "
                          "_done/) nor an output root holding runs/")
    if len(names) == 1:
        return join(uri, "runs", names[0]), f"run {names[0]}, the only run under {uri}/runs/"
    from pipeline.summary import read_summaries

    finished: dict[str, Any] = {}
    table = read_summaries(uri)
    for r in table.select(["run_id", "finished_at"]).to_pylist() if table is not None else []:
        if r["run_id"] in names and (r["run_id"] not in finished or r["finished_at"] > finished[r["run_id"]]):
            finished[r["run_id"]] = r["finished_at"]
    if finished:
        # finished_at has whole seconds: two runs in the same second are told apart by their files' times
        newest = max(finished, key=lambda n: (finished[n], _last_written(fs, f"{runs_path}/{n}"), n))
    else:
        newest = max(names, key=lambda n: (_last_written(fs, f"{runs_path}/{n}"), n))
    return (join(uri, "runs", newest),
            f"run {newest}, the newest of {len(names)} runs under {uri}/runs/ (--run-id to choose another)")


# ---------------------------------------------------------------- bit depth of the source
def png_bit_depth(data: bytes | None, path: str = "") -> int:
    """8 or 16: the bit depth an image of these stored bytes is exported at (8 for a PNG of 8 bits or
    fewer per sample, 16 for a 16-bit PNG and for float ``.npy`` bytes; 16 when unknown)."""
    if not data:
        return 16
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return 16 if data[24] == 16 else 8
    return 16


def _source_bits(dataset: str | None, shard: str, rows: Iterable[int]) -> dict[int, int] | None:
    """``{row: bits}`` of the observations of ``rows`` in the input shard (an ingested file's ``source_bits``
    where there is one: 8 for 8 bits or fewer, else 16); None if it cannot be read."""
    if not dataset:
        return None
    try:
        try:
            table = read_table(join(dataset, shard), ["observation", "source_bits"], attempts=2)
        except MissingColumnError:  # not an ingested dataset
            table = read_table(join(dataset, shard), ["observation"], attempts=2)
    except Exception:
        return None
    cells = table.column("observation").to_pylist()
    source = (table.column("source_bits").to_pylist() if "source_bits" in table.column_names
              else [None] * len(cells))
    return {r: (8 if source[r] <= 8 else 16) if source[r] is not None
            else png_bit_depth((cells[r] or {}).get("bytes"), (cells[r] or {}).get("path") or "")
            for r in rows if 0 <= r < len(cells)}


# ---------------------------------------------------------------- the export
@dataclass
class Exported:
    run: str  # the run folder
    chosen: str  # how the run was chosen from an output root ("" when RUN was the run folder)
    dir: str
    images: int
    bits: dict[int, int]  # images per bit depth
    noise: bool
    csv: str
    unknown_source: int  # images whose input shard could not be read (written at 16 bits)

    def describe(self) -> str:
        depth = ", ".join(f"{n} at {b} bits" for b, n in sorted(self.bits.items())) or "none"
        noise = f" and their noise estimates in {self.dir}/noise/" if self.noise else ""
        unknown = (f"; the input of {self.unknown_source} image(s) could not be read from here, so they are "
                   "16-bit, the depth cleaned/ stores") if self.unknown_source else ""
        return (f"exported {self.images} cleaned image(s) of {self.run} to {self.dir}/ ({depth}){noise}; "
                f"{self.csv} maps each file to its id{unknown}")


def _png(cell: dict[str, Any] | None, bits: int) -> bytes | None:
    """PNG bytes of a stored image cell at ``bits``; the stored 16-bit PNG as it is when it fits."""
    if not cell or not cell.get("bytes"):
        return None
    data = cell["bytes"]
    if bits == 16 and png_bit_depth(data, cell.get("path") or "") == 16 and data[:4] == b"\x89PNG":
        return data
    return encode_png(from_float(to_float(decode_image(data, cell.get("path") or "")), bits))


def _inside(root: str, name: str, sub: str = "") -> str:
    """``root[/sub]/name``, refusing a name that could reach outside (a guard: :func:`safe_names` made it)."""
    if not is_plain_name(name):
        raise ValueError(f"refusing to write {name!r}: not a plain file name inside {root}")
    return join(root, sub, name) if sub else join(root, name)


def export_run(run: str, out_dir: str, run_id: str | None = None, noise: bool = False,
               progress: bool = True, log: Callable[[str], None] | None = None) -> Exported:
    """Write the cleaned images of a run (see :func:`resolve_run`) as PNG files in ``out_dir`` (any URI;
    created if missing), with ``export.csv``; ``noise`` also writes the noise estimates. ``log`` is told
    which run was taken when ``run`` is an output root, before the work starts."""
    from tqdm import tqdm

    run_uri, chosen = resolve_run(run, run_id)
    if chosen and log is not None:
        log(f"exporting {chosen}")
    parts = list_parts(join(run_uri, "cleaned"))
    metrics: dict[str, dict[str, Any]] = {}  # id -> its metrics row (shard, row, dataset)
    for part in list_parts(join(run_uri, "metrics")):
        for r in read_table(part, ["id", "shard", "row", "dataset"], attempts=3).to_pylist():
            metrics[r["id"]] = r
    columns = ["id", "denoised"] + (["noise_estimate"] if noise else [])
    tables = [(p, read_table(p, ["id"], attempts=3).column("id").to_pylist()) for p in parts]
    ids = [i for _, shard_ids in tables for i in shard_ids]
    names = file_names(ids)
    out_dir = str(out_dir).rstrip("/")
    fs, root = open_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    bits_count: Counter[int] = Counter()
    unknown = 0
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(ids), desc=f"export {run_uri.rsplit('/', 1)[-1]}", unit="img", disable=not progress) as bar:
        for part, _ in tables:
            table = read_table(part, columns, attempts=3).to_pylist()
            shard = part.rsplit("/", 1)[-1]
            meta = [metrics.get(r["id"], {}) for r in table]
            dataset = next((m.get("dataset") for m in meta if m.get("dataset")), None)
            source = _source_bits(dataset, shard, [m["row"] for m in meta if m.get("row") is not None])
            for r, m in zip(table, meta):
                bits = (source or {}).get(m.get("row", -1))
                if bits is None:
                    unknown += 1
                    bits = 16
                name = names[r["id"]]
                data = _png(r["denoised"], bits)
                if data is None:
                    raise ValueError(f"{part}: the row of id {r['id']!r} has no denoised image")
                write_atomic(_inside(out_dir, name), data)
                row = {"file": name, "id": r["id"], "shard": m.get("shard", shard), "row": m.get("row"),
                       "bits": bits}
                if noise:
                    nd = _png(r.get("noise_estimate"), bits)
                    if nd is not None:
                        write_atomic(_inside(out_dir, name, "noise"), nd)
                    row["noise_file"] = f"noise/{name}" if nd is not None else ""
                rows.append(row)
                bits_count[bits] += 1
                bar.update(1)
    buf = io.StringIO()
    fields = ["file", "id", "shard", "row", "bits"] + (["noise_file"] if noise else [])
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_uri = join(out_dir, CSV_NAME)
    write_atomic(csv_uri, buf.getvalue().encode("utf-8"))
    return Exported(run_uri, chosen, out_dir, len(rows), dict(bits_count), noise, csv_uri, unknown)
