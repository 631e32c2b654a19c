"""Parquet image shards on any fsspec URI, readable without this package.

A dataset is a folder of ``shard-00000.parquet, shard-00001.parquet, ...``. Image columns are the
Hugging Face ``datasets`` layout, a struct ``{bytes: binary, path: string}``; the bytes are a PNG
(8- or 16-bit, grey or RGB) or, for values outside [0, 1], a float32 ``.npy`` (``path`` ends in
``.npy``). ``path`` is the row id made a safe file name (``../x`` -> ``___x.png``), since tools save
the image there; the ``id`` column keeps the id as it is. The Parquet schema carries the ``huggingface``
metadata that makes ``datasets.Dataset.from_parquet`` decode these columns as images; pandas and DuckDB
see a plain struct column.

Arrays in this module are ``(H, W)`` or ``(H, W, C)`` in their stored dtype (uint8, uint16,
float32); :func:`to_float` turns one into the ``(C, H, W)`` float32 in [0, 1] that models use.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.storage import join, makedirs, open_fs, write_atomic
from pipeline.untrusted import MAX_NAME_BYTES, safe_stems

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SHARD_PATTERN = "shard-{:05d}.parquet"


class ShardError(ValueError):
    """A shard or one of its rows cannot be read; the message names the shard, row and id."""


# ---------------------------------------------------------------- encoding
def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, C) uint8/uint16 array, C in {1, 2, 3, 4} (grey, grey and alpha, RGB,
    RGBA: a text layer, :class:`pipeline.forward.Composite`)."""
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"encode_png takes uint8 or uint16 arrays, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (2, 3, 4)):
        raise ValueError(f"encode_png takes (H, W) or (H, W, 2|3|4) arrays, got shape {img.shape}")
    if img.dtype == np.uint8:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()
    import png  # pypng: Pillow cannot write 16-bit RGB

    h, w = img.shape[:2]
    planes = 1 if img.ndim == 2 else img.shape[2]
    buf = io.BytesIO()
    png.Writer(w, h, greyscale=planes <= 2, alpha=planes in (2, 4), bitdepth=16).write(
        buf, img.reshape(h, w * planes).tolist())
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_image(data: bytes, path: str = "") -> np.ndarray:
    """Decode PNG (any bit depth, grey/RGB/RGBA as stored) or ``.npy`` bytes to an array. A failure's
    message says what went wrong (:func:`decoder_failure`), never which bytes."""
    if data is None or len(data) == 0:
        raise ValueError("empty image bytes")
    try:
        return _decode_image(data, path)
    except Exception as exc:
        raise ValueError(decoder_failure(exc)) from exc


def decoder_failure(exc: BaseException) -> str:
    """What went wrong in a decoder, without the quotes of the data that decoders' messages carry (a
    chunk name, the first bytes, a header): truncated, a checksum, or the kind of error."""
    if isinstance(exc, _OwnError):
        return str(exc)
    msg = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in msg or "end of file" in msg or "eof" in msg:
        return "image file is truncated"
    if "checksum" in msg or "crc" in msg:
        return "a checksum does not match (the file is damaged)"
    return f"damaged or unsupported data ({type(exc).__name__})"


class _OwnError(ValueError):
    """A message of this module's own, safe to show as it is."""


def _decode_image(data: bytes, path: str) -> np.ndarray:
    if path.endswith(".npy") or data[:6] == b"\x93NUMPY":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.kind not in "fu":
            raise _OwnError(f".npy image of dtype {arr.dtype}: expected float or unsigned integers")
        return arr
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise _OwnError("not a PNG (no PNG signature) nor a .npy array")
    bit_depth = data[24] if len(data) > 24 else 8
    if bit_depth == 16:
        import png

        # read(), not asDirect(): asDirect() shifts values down to an sBIT depth and adds alpha for tRNS
        w, h, rows, info = png.Reader(bytes=data).read()
        planes = info["planes"]
        arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
        return arr[:, :, 0] if planes == 1 else arr
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode == "P":  # a palette holds colours: never collapse it to grey
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
            im = im.convert("RGB")
        return np.asarray(im)


def from_float(img: np.ndarray, bits: int = 8) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W[, C]) uint8/uint16, rounded to nearest."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = 255 if bits == 8 else 65535
    q = np.rint(np.clip(img, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
    q = np.moveaxis(q, 0, -1)
    return q[:, :, 0] if q.shape[2] == 1 else q


def to_float(arr: np.ndarray) -> np.ndarray:
    """(H, W[, C]) stored array -> (C, H, W) float32; integers are scaled to [0, 1]."""
    a = arr[:, :, None] if arr.ndim == 2 else arr
    if a.dtype.kind == "u":
        a = a.astype(np.float32) / np.iinfo(a.dtype).max
    return np.ascontiguousarray(np.moveaxis(a.astype(np.float32), -1, 0))


def image_cell(img: np.ndarray, name: str, bits: int = 8) -> dict[str, object]:
    """The ``{bytes, path}`` struct for one image: PNG for integer (H, W[, C]) arrays or (C, H, W)
    floats in [0, 1] (quantised to ``bits``), an (H, W, C) float32 ``.npy`` for floats that leave
    [0, 1] or are not finite (so a bad value is kept, not hidden, and validation can reject it).

    ``path`` is ``name`` with the suffix: ``name`` must be a plain file name (:func:`build_table` makes
    one from the row id with :func:`pipeline.untrusted.safe_stems`), since readers may save the image there."""
    if img.dtype.kind == "u":
        return {"bytes": encode_png(img), "path": f"{name}.png"}
    if np.all(np.isfinite(img)) and img.min() >= 0.0 and img.max() <= 1.0:
        return {"bytes": encode_png(from_float(img, bits)), "path": f"{name}.png"}
    return {"bytes": encode_npy(np.moveaxis(img, 0, -1)), "path": f"{name}.npy"}  # (H, W, C) like PNG


# ---------------------------------------------------------------- writing
def hf_metadata(image_columns: Sequence[str], other: dict[str, pa.DataType]) -> dict[bytes, bytes]:
    features: dict[str, object] = {c: {"_type": "Image"} for c in image_columns}
    names = {"float": "float32", "double": "float64", "halffloat": "float16", "large_string": "string"}
    for name, typ in other.items():
        if typ == IMAGE_TYPE:  # an image column holding .npy arrays: a plain {bytes, path} struct
            features[name] = {"bytes": {"dtype": "binary", "_type": "Value"},
                              "path": {"dtype": "string", "_type": "Value"}}
        else:
            features[name] = {"dtype": names.get(str(typ), str(typ)), "_type": "Value"}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


ROW_GROUP_BYTES = 64 * 2**20  # a Parquet row group holds about this much (readers load a group at once)


def write_table(uri: str, table: pa.Table, row_group_bytes: int = ROW_GROUP_BYTES) -> None:
    """Write ``table`` as Parquet, atomically: a reader, or a second writer of the same file (a retried
    shard whose first attempt is still finishing), never leaves or sees a torn file. Row groups hold about
    ``row_group_bytes`` each (at least one row), so a shard of large images is never one huge group."""
    buf = io.BytesIO()
    rows = table.num_rows * row_group_bytes // max(table.nbytes, 1) if table.num_rows else 1
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, min(rows, 1024 * 1024)))
    write_atomic(uri, buf.getvalue())


def write_dataset(uri: str, ids: Sequence[str], images: dict[str, Sequence[np.ndarray] | np.ndarray],
                  bits: dict[str, int] | None = None, extra: dict[str, pa.Array | Sequence[object]] | None = None,
                  shard_size: int = 1000) -> list[str]:
    """Write shards with an ``id`` column, image columns (``{name: images}``) and plain columns.

    Images are float (C, H, W) in [0, 1] (PNG at ``bits[name]``, default 8), stored-dtype integer
    arrays (PNG as they are), or floats outside [0, 1] (``.npy``). Returns the shard URIs written.
    """
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique within a dataset")
    for name, col in {**images, **(extra or {})}.items():
        if len(col) != len(ids):
            raise ValueError(f"column '{name}' has {len(col)} values for {len(ids)} ids")
    fs, root = open_fs(uri)
    makedirs(fs, root)
    written = []
    for k, start in enumerate(range(0, max(len(ids), 1), shard_size)):
        sl = slice(start, start + shard_size)
        table = build_table(ids[sl], {n: v[sl] for n, v in images.items()}, bits,
                            {n: v[sl] for n, v in (extra or {}).items()})
        shard_uri = join(uri, SHARD_PATTERN.format(k))
        write_table(shard_uri, table)
        written.append(shard_uri)
    return written


def build_table(ids: Sequence[str], images: dict[str, Sequence[np.ndarray] | np.ndarray],
                bits: dict[str, int] | None = None,
                extra: dict[str, pa.Array | Sequence[object]] | None = None) -> pa.Table:
    """One shard's table: ``id`` (the raw ids), image struct columns (whose ``path`` is the id made a safe
    file name, unique in the table), plain columns, and the HF features metadata."""
    cols: dict[str, pa.Array] = {"id": pa.array(list(ids), pa.string())}
    # the struct's path names a file (datasets' save_to_disk, export tools): a safe name, never the raw id
    stems = safe_stems(ids, MAX_NAME_BYTES - 4) if images else []
    for name, arrays in images.items():
        b = (bits or {}).get(name, 8)
        cols[name] = pa.array([image_cell(np.asarray(im), s, b) for s, im in zip(stems, arrays)], IMAGE_TYPE)
    for name, values in (extra or {}).items():
        cols[name] = values if isinstance(values, pa.Array) else pa.array(list(values))
    table = pa.table(cols)
    # `datasets` decodes an Image feature with PIL, which cannot read .npy cells: declare those plain
    png_cols = [n for n in images if not any(str(p).endswith(".npy") for p in cols[n].field("path").to_pylist())]
    return table.replace_schema_metadata(
        hf_metadata(png_cols, {n: table.schema.field(n).type for n in cols if n not in png_cols}))


def write_image_shards(uri: str, ids: Sequence[str], images: Sequence[np.ndarray] | np.ndarray,
                       column: str = "image", shard_size: int = 1000, bits: int = 8,
                       extra: dict[str, Sequence[object]] | None = None) -> list[str]:
    """Write one image column (an images dataset, docs/concepts/outputs.md) as shards under ``uri``."""
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids but {len(images)} images")
    return write_dataset(uri, ids, {column: images}, {column: bits}, extra, shard_size)


# ---------------------------------------------------------------- reading
def list_shards(uri: str) -> list[str]:
    """The dataset's shard URIs in a stable (sorted) order."""
    return [u for u, _ in list_shard_infos(uri)]


def list_shard_infos(uri: str) -> list[tuple[str, dict[str, Any]]]:
    """The dataset's shards in a stable (sorted) order, each with its listing entry (size, ETag or mtime):
    one listing call, whatever the number of shards."""
    fs, root = open_fs(uri)
    fs.invalidate_cache(root)  # s3fs keeps listings: a long-lived process would see shards as they were
    if not fs.exists(root):
        raise ShardError(f"{str(uri).removeprefix('file://')}: no such dataset folder")
    infos = sorted((i for i in fs.ls(root, detail=True) if str(i["name"]).endswith(".parquet")),
                   key=lambda i: str(i["name"]).rsplit("/", 1)[-1])
    if not infos:
        raise ShardError(f"{uri}: no .parquet shards in this folder")
    return [(join(uri, str(i["name"]).rsplit("/", 1)[-1]), i) for i in infos]


class MissingColumnError(ShardError):
    """The shard is readable but lacks a column that was asked for."""


class NotParquetError(ShardError):
    """The file was read but is not Parquet: a retry would read the same bytes."""


class ShardMissingError(ShardError):
    """No file at the shard's URI: the stores read here are read-after-write consistent, so a retry would not
    find one (a shard removed under a run)."""


def read_table(shard_uri: str, columns: Sequence[str] | None = None, attempts: int = 1,
               retry_delay: float = 1.0) -> pa.Table:
    """Read a shard (only ``columns``, when given). A failed read is tried ``attempts`` times in all,
    ``retry_delay`` seconds apart (doubling), so a transient storage error is not taken for a broken
    shard. What no retry can change fails at once: a missing column (:class:`MissingColumnError`), a
    missing file (:class:`ShardMissingError`), and a file whose bytes are not Parquet (no footer magic,
    too short: the writers here replace files atomically, so such a file is not one half-written)."""
    for attempt in range(attempts):
        fs, path = open_fs(shard_uri)
        try:
            with fs.open(path, "rb") as f:
                try:
                    pf = pq.ParquetFile(f)
                except pa.ArrowInvalid as exc:
                    raise NotParquetError(f"{shard_uri}: cannot read Parquet ({exc})") from exc
                names = pf.schema_arrow.names
                missing = [c for c in columns or () if c not in names]
                if not missing:  # only the columns asked for are read (an id scan skips the images)
                    # use_threads=False: reading through a Python file object with Arrow's thread pool
                    # aborts or hangs the interpreter at exit now and then (apache/arrow#34314, #50482).
                    return pf.read(columns=list(columns) if columns else None, use_threads=False)
            raise MissingColumnError(f"{shard_uri}: missing column(s) {missing}; has {names}")
        except (MissingColumnError, NotParquetError):
            raise
        except FileNotFoundError as exc:
            raise ShardMissingError(f"{shard_uri}: cannot read Parquet ({exc})") from exc
        except Exception as exc:
            if attempt + 1 >= attempts:
                raise ShardError(f"{shard_uri}: cannot read Parquet ({exc})") from exc
            time.sleep(retry_delay * 2 ** attempt)
    raise AssertionError("unreachable")


def list_parts(uri: str) -> list[str]:
    """URIs of every ``.parquet`` file under ``uri``, recursively, sorted (none if it does not exist)."""
    fs, root = open_fs(uri)
    if not fs.exists(root):
        return []
    return [join(uri, p[len(root.rstrip("/")) + 1:]) for p in sorted(fs.find(root)) if p.endswith(".parquet")]


def iter_images(shard_uri: str, column: str = "image",
                on_bad: Callable[[ShardError], None] | None = None) -> Iterator[tuple[int, str, np.ndarray]]:
    """Yield ``(row, id, stored array)`` for each row; a bad row raises :class:`ShardError`, or with ``on_bad`` is
    passed to it and left out."""
    table = read_table(shard_uri, ["id", column])
    ids = table.column("id").to_pylist()
    cells = table.column(column).to_pylist()
    for row, (id_, cell) in enumerate(zip(ids, cells)):
        try:
            if cell is None:
                raise ValueError("image is null")
            yield row, id_, decode_image(cell["bytes"], cell.get("path") or "")
        except ShardError:
            raise
        except Exception as exc:
            bad = ShardError(f"{shard_uri}: row {row} (id {id_!r}), column '{column}': cannot decode image: {exc}")
            if on_bad is None:
                raise bad from exc
            on_bad(bad)


def read_images(uri: str, column: str = "image", limit: int | None = None,
                on_bad: Callable[[ShardError], None] | None = None) -> tuple[list[str], list[np.ndarray]]:
    """All ``(ids, stored arrays)`` of a dataset folder (or of one ``.parquet`` shard); with ``limit``, the first
    ``limit`` rows only (the shards after them are not read); ``on_bad``: as :func:`iter_images`."""
    shards = [uri] if str(uri).endswith(".parquet") else list_shards(uri)
    ids: list[str] = []
    arrays: list[np.ndarray] = []
    for shard in shards:
        if limit is not None and len(ids) >= limit:
            break
        for _row, id_, arr in iter_images(shard, column, on_bad):
            if limit is not None and len(ids) >= limit:
                break
            ids.append(id_)
            arrays.append(arr)
    return ids, arrays
