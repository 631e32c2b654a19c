"""Object storage through a real S3 protocol (moto server): s3fs and pyarrow see the same bucket."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import storage
from pipeline.data.shards import read_images, write_image_shards


def test_shards_written_through_s3fs_are_read_by_pyarrow_s3filesystem(s3):
    bucket, endpoint = s3
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 8, 8), np.float32)
    write_image_shards(f"{bucket}/ds", [f"i{k}" for k in range(5)], images, shard_size=2, bits=16)
    afs, path = storage.arrow_fs(f"{bucket}/ds")
    assert type(afs).__name__ == "S3FileSystem"
    # pyarrow ignores AWS_ENDPOINT_URL: it reaches moto only because arrow_fs passes endpoint_override
    table = pq.read_table(f"{path}/shard-00001.parquet", filesystem=afs)
    assert table.column("id").to_pylist() == ["i2", "i3"]
    ids, arrays = read_images(f"{bucket}/ds")
    assert ids == [f"i{k}" for k in range(5)]
    assert np.abs(arrays[4] / 65535.0 - images[4, 0]).max() < 1e-4


def test_explicit_config_wins_over_the_environment_and_secrets_stay_hidden(s3, monkeypatch):
    bucket, endpoint = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = storage.StorageConfig(endpoint_url=endpoint, key="testing-key", secret="testing-secret-do-not-print")
    storage.configure(cfg)
    try:
        fs, path = storage.open_fs(f"{bucket}/x.bin")
        fs.pipe_file(path, b"hello")
        assert fs.cat_file(path) == b"hello"
        afs, apath = storage.arrow_fs(f"{bucket}/x.bin", cfg)
        with afs.open_input_stream(apath) as f:
            assert f.read() == b"hello"
    finally:
        storage.configure(None)
    shown = f"{cfg} {cfg!r} {cfg.describe()} {cfg.model_dump()}"
    assert "testing-secret-do-not-print" not in shown
    assert cfg.describe()["credentials"] == "set"


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "m" / "done.json"
    storage.write_atomic(str(target), b'{"ok": 1}')
    assert target.read_bytes() == b'{"ok": 1}' and [p.name for p in target.parent.iterdir()] == ["done.json"]


def test_unknown_bucket_names_the_uri(s3):
    bucket, _ = s3
    with pytest.raises(Exception, match="no-such-bucket-here"):
        read_images("s3://no-such-bucket-here/ds")
