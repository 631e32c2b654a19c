"""Parquet image shards: round trips, corrupt rows, and reading without this package."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import (
    IMAGE_TYPE,
    ShardError,
    decode_image,
    encode_png,
    from_float,
    list_shards,
    read_images,
    to_float,
    write_image_shards,
)


def _arrays(dtype, channels, n=5, size=9, seed=0):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    shape = (size, size + 2) if channels == 1 else (size, size + 2, 3)
    return [rng.integers(0, top + 1, shape, dtype=np.int64).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 1), (np.uint8, 3), (np.uint16, 1), (np.uint16, 3)])
def test_round_trip_keeps_ids_values_and_dtype(tmp_path, dtype, channels):
    arrays = _arrays(dtype, channels)
    ids = [f"img/{k:03d}" for k in range(len(arrays))]
    written = write_image_shards(str(tmp_path / "ds"), ids, arrays, shard_size=2)
    assert [w.rsplit("/", 1)[-1] for w in written] == ["shard-00000.parquet", "shard-00001.parquet",
                                                       "shard-00002.parquet"]
    got_ids, got = read_images(str(tmp_path / "ds"))
    assert got_ids == ids
    for a, b in zip(arrays, got):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(a, b)


def test_float_images_quantise_exactly_and_out_of_range_go_to_npy(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.random((1, 8, 8)).astype(np.float32)
    wide = (rng.random((1, 8, 8)) * 2).astype(np.float32)  # the sum model's observation, in [0, 2]
    write_image_shards("memory://ds-float", ["a", "b"], [img, wide], bits=16)
    ids, (a, b) = read_images("memory://ds-float")
    assert a.dtype == np.uint16 and np.abs(to_float(a) - img).max() <= 0.5 / 65535 + 1e-7
    assert b.dtype == np.float32 and b.shape == (8, 8, 1) and np.array_equal(to_float(b), wide)
    table = pq.read_table(io.BytesIO(_memory_bytes("/ds-float/shard-00000.parquet")))
    assert [c["path"] for c in table.column("image").to_pylist()] == ["a.png", "b.npy"]


def _memory_bytes(path):
    import fsspec

    return fsspec.filesystem("memory").cat_file(path)


def test_corrupt_png_names_shard_row_and_id(tmp_path):
    good = encode_png(np.zeros((4, 4), np.uint8))
    table = pa.table({"id": ["ok-1", "broken-7", "ok-2"],
                      "image": pa.array([{"bytes": good, "path": "1.png"},
                                         {"bytes": good[: len(good) // 2], "path": "7.png"},
                                         {"bytes": good, "path": "2.png"}], IMAGE_TYPE)})
    (tmp_path / "ds").mkdir()
    pq.write_table(table, tmp_path / "ds" / "shard-00000.parquet")
    with pytest.raises(ShardError) as err:
        read_images(str(tmp_path / "ds"))
    msg = str(err.value)
    assert "shard-00000.parquet" in msg and "'broken-7'" in msg and "row 1" in msg


def test_missing_column_and_empty_folder_are_clear(tmp_path):
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "ds" / "shard-00000.parquet")
    with pytest.raises(ShardError, match="missing column"):
        read_images(str(tmp_path / "ds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .parquet shards"):
        list_shards(str(tmp_path / "empty"))


def test_shards_open_without_this_package(tmp_path):
    """DuckDB reads the struct column; Pillow decodes the bytes; the HF features metadata is present."""
    import json

    import duckdb
    from PIL import Image

    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    write_image_shards(str(tmp_path / "ds"), ["x"], [img])
    path = str(tmp_path / "ds" / "shard-00000.parquet")
    row = duckdb.sql(f"SELECT id, image.path AS p, image.bytes AS b FROM read_parquet('{path}')").fetchall()[0]
    assert row[0] == "x" and row[1] == "x.png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row[2]))), img)
    meta = json.loads(pq.read_schema(path).metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}


def test_from_float_to_float_round_trip():
    x = np.linspace(0, 1, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    for bits in (8, 16):
        top = 255 if bits == 8 else 65535
        back = to_float(from_float(x, bits))
        assert back.shape == x.shape and np.abs(back - x).max() <= 0.5 / top + 1e-7


def test_decodes_png_variants_written_by_other_tools():
    import png
    from PIL import Image

    buf = io.BytesIO()  # 16-bit data with an sBIT chunk (12 significant bits)
    png.Writer(2, 1, greyscale=True, bitdepth=12).write(buf, [[0, 4095]])
    arr = decode_image(buf.getvalue())
    assert arr.dtype == np.uint16 and to_float(arr).max() == 1.0
    buf = io.BytesIO()  # 16-bit grey with a tRNS chunk: stays one channel
    png.Writer(2, 1, greyscale=True, bitdepth=16, transparent=0).write(buf, [[0, 65535]])
    assert decode_image(buf.getvalue()).shape == (1, 2)
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.putdata([0, 1, 2])
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert np.array_equal(decode_image(buf.getvalue()), np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]))
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2, 1), np.int64))
    with pytest.raises(ValueError, match="dtype int64"):
        decode_image(buf.getvalue(), "x.npy")


def test_a_file_that_is_not_parquet_or_is_missing_fails_at_once_and_a_failed_read_is_retried(tmp_path):
    import time

    from pipeline.data.shards import NotParquetError, ShardMissingError, read_table

    (tmp_path / "shard-00000.parquet").write_bytes(b"PAR1 but not really")
    t0 = time.perf_counter()
    with pytest.raises(NotParquetError, match="shard-00000.parquet: cannot read Parquet"):
        read_table(str(tmp_path / "shard-00000.parquet"), attempts=3, retry_delay=10.0)
    assert time.perf_counter() - t0 < 5  # no retry: the same bytes would come back
    with pytest.raises(ShardMissingError, match="shard-00001.parquet: cannot read Parquet"):
        read_table(str(tmp_path / "shard-00001.parquet"), attempts=3, retry_delay=10.0)  # no such file
    assert time.perf_counter() - t0 < 5  # no retry either: the stores here are read-after-write consistent
    (tmp_path / "folder.parquet").mkdir()  # a read that fails otherwise is retried
    t0 = time.perf_counter()
    with pytest.raises(ShardError, match="folder.parquet: cannot read Parquet") as err:
        read_table(str(tmp_path / "folder.parquet"), attempts=3, retry_delay=0.1)
    assert time.perf_counter() - t0 >= 0.3 and type(err.value) is ShardError  # tried 3 times
