"""Ingest: files on any URI -> observation shards; bad inputs go to the errors table, nothing is lost."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import storage
from pipeline.data.ingest import IngestConfig, ingest
from pipeline.data.shards import decode_image, encode_png, to_float
from pipeline.data.validate import ImagePolicy
from tests.test_cli import jointdiff


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    if arr.dtype == np.uint16:
        return encode_png(arr)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def corpus(rng: np.random.Generator) -> dict[str, bytes]:
    """Good files, files the policy converts, and broken files; name -> bytes."""
    grey = (rng.random((16, 16)) * 255).astype(np.uint8)
    good = png(grey)
    return {
        "good/a.png": good,
        "good/b.png": png((rng.random((16, 16)) * 255).astype(np.uint8)),
        "convert/rgba.png": png((rng.random((16, 16, 4)) * 255).astype(np.uint8), "RGBA"),  # 4 channels
        "convert/deep.png": encode_png((rng.random((16, 16)) * 65535).astype(np.uint16)),  # 16-bit
        "convert/big.png": png((rng.random((40, 24)) * 255).astype(np.uint8)),  # another size
        "convert/photo.jpg": _jpeg((rng.random((16, 16, 3)) * 255).astype(np.uint8)),
        "convert/ok.npy": _npy(rng.random((16, 16)).astype(np.float32)),
        "bad/truncated.png": good[: len(good) // 2],
        "bad/zero.png": b"",
        "bad/text.png": b"this is not an image, just text in a file named .png\n",
        "bad/huge.png": png(np.zeros((5000, 4000), np.uint8)),  # 20M pixels > 16.7M: refused unread
        "bad/nan.npy": _npy(np.where(np.eye(16) > 0, np.nan, 0.5).astype(np.float32)),
        "bad/inf.npy": _npy(np.full((16, 16), np.inf, np.float32)),
        "bad/notes.txt": b"not an image",
    }


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_tree(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


POLICY = ImagePolicy(size=16, channels=1, resize="resize", alpha="drop")


def errors_of(dst) -> dict[str, tuple[str, str]]:
    t = pq.read_table(dst / "_errors")
    return {r["id"]: (r["stage"], r["reason"]) for r in t.to_pylist()}


def test_bad_inputs_land_in_the_errors_table_and_good_ones_are_all_kept(tmp_path):
    files = corpus(np.random.default_rng(0))
    write_tree(tmp_path / "src", files)
    (tmp_path / "src" / ".DS_Store").write_bytes(b"hidden: not an input")
    dst = tmp_path / "obs"
    summary = ingest(str(tmp_path / "src"), str(dst), IngestConfig(policy=POLICY, shard_size=5), progress=False)
    errors = errors_of(dst)
    kept = pq.read_table(dst).column("id").to_pylist()
    # every input is in exactly one place
    assert sorted(kept + list(errors)) == sorted(files) and not set(kept) & set(errors)
    assert summary["inputs"] == len(files) == summary["ingested"] + summary["errors"]
    assert set(kept) == {n for n in files if not n.startswith("bad/")}
    assert errors["bad/zero.png"] == ("decode", "empty file (0 bytes)")
    assert "cannot decode PNG" in errors["bad/truncated.png"][1]
    assert errors["bad/text.png"] == ("decode", "text (53 bytes), not an image")  # described, never quoted
    assert "20,000,000 pixels, over the limit" in errors["bad/huge.png"][1]
    assert errors["bad/nan.npy"] == ("validate", "16 NaN or infinite value(s)")
    assert errors["bad/inf.npy"] == ("validate", "256 NaN or infinite value(s)")
    assert "unsupported file type .txt" in errors["bad/notes.txt"][1]
    # converted rows are what the policy says: 16x16 grey, 16-bit deep values kept to 16-bit precision
    table = pq.read_table(dst)
    deep = dict(zip(table.column("id").to_pylist(), table.column("observation").to_pylist()))["convert/deep.png"]
    original = to_float(decode_image(files["convert/deep.png"]))
    assert np.abs(to_float(decode_image(deep["bytes"])) - original).max() < 1e-4
    for cell in pq.read_table(dst).column("observation").to_pylist():
        assert decode_image(cell["bytes"]).shape == (16, 16)


def test_a_strict_policy_rejects_what_a_lenient_one_converts(tmp_path):
    files = corpus(np.random.default_rng(1))
    write_tree(tmp_path / "src", {k: v for k, v in files.items() if k.startswith("convert/")})
    strict = IngestConfig(policy=ImagePolicy(size=16, channels=1, resize="error", alpha="error"))
    ingest(str(tmp_path / "src"), str(tmp_path / "obs"), strict, progress=False)
    errors = errors_of(tmp_path / "obs")
    assert ("40x24 pixels but 16x16 expected (--set policy.resize=resize or policy.resize=center-crop"
            in errors["convert/big.png"][1])  # the keys a user can --set, not a bare `resize`
    assert "alpha channel" in errors["convert/rgba.png"][1]
    assert set(pq.read_table(tmp_path / "obs").column("id").to_pylist()) == {
        "convert/deep.png", "convert/photo.jpg", "convert/ok.npy"}


def test_duplicate_ids_in_a_tar_keep_the_first_copy(tmp_path):
    rng = np.random.default_rng(2)
    a, b = png((rng.random((16, 16)) * 255).astype(np.uint8)), png((rng.random((16, 16)) * 255).astype(np.uint8))
    with tarfile.open(tmp_path / "src.tar", "w") as tf:
        for name, data in (("x/one.png", a), ("x/two.png", b), ("x/one.png", b)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ingest(str(tmp_path / "src.tar"), str(tmp_path / "obs"), IngestConfig(policy=POLICY), progress=False)
    table = pq.read_table(tmp_path / "obs")
    assert table.column("id").to_pylist() == ["x/one.png", "x/two.png"]
    first = to_float(decode_image(table.column("observation").to_pylist()[0]["bytes"]))
    assert np.abs(first - to_float(decode_image(a))).max() < 1e-4  # the first copy, not the later one
    assert "duplicate id 'x/one.png'" in errors_of(tmp_path / "obs")["x/one.png"][1]


def test_rerun_is_identical_and_redoes_exactly_the_shard_whose_marker_is_gone(tmp_path):
    rng = np.random.default_rng(3)
    write_tree(tmp_path / "src", {f"img{k:02d}.png": png((rng.random((16, 16)) * 255).astype(np.uint8))
                                  for k in range(7)})
    cfg = IngestConfig(policy=POLICY, shard_size=3)
    first = ingest(str(tmp_path / "src"), str(tmp_path / "obs"), cfg, progress=False)
    assert first["written"] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "obs").glob("*.parquet")}
    again = ingest(str(tmp_path / "src"), str(tmp_path / "obs"), cfg, progress=False)
    assert again["written"] == [] and len(again["skipped"]) == 3 and again["ingested"] == 7
    (tmp_path / "obs" / "_done" / "shard-00001.json").unlink()
    (tmp_path / "obs" / "shard-00001.parquet").write_bytes(b"torn")  # as a crash mid-write would leave it
    redo = ingest(str(tmp_path / "src"), str(tmp_path / "obs"), cfg, progress=False)
    assert redo["written"] == ["shard-00001.parquet"] and redo["skipped"] == ["shard-00000.parquet",
                                                                              "shard-00002.parquet"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "obs").glob("*.parquet")} == before  # same bytes
    # a second ingest of the same source elsewhere writes the same shards
    ingest(str(tmp_path / "src"), str(tmp_path / "obs2"), cfg, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "obs2").glob("*.parquet")} == before


def test_ingest_from_a_bucket_to_a_bucket_read_back_with_pyarrow(s3, tmp_path):
    bucket, _ = s3
    files = {k: v for k, v in corpus(np.random.default_rng(4)).items() if not k.startswith("bad/huge")}
    fs, _ = storage.open_fs(bucket)
    for name, data in files.items():
        fs.pipe_file(f"{bucket[5:]}/raw/{name}", data)
    proc = jointdiff("ingest", f"{bucket}/raw", f"{bucket}/obs", "--size", "16", "--channels", "1",
                     "--resize", "resize", "--shard-size", "4")  # not quiet: everything it says is checked
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == len(files) and summary["errors"] == 6
    afs, path = storage.arrow_fs(f"{bucket}/obs")
    table = pq.read_table(path, filesystem=afs)  # the whole dataset folder, through pyarrow's S3 client
    assert sorted(table.column("id").to_pylist()) == sorted(n for n in files if not n.startswith("bad/"))
    errs = pq.read_table(f"{path}/_errors", filesystem=afs)
    assert errs.num_rows == 6 and set(errs.column_names) >= {"run_id", "shard", "id", "stage", "reason"}
    assert "rejected: " in proc.stderr and "storage: {'endpoint_url': 'http://127.0.0.1" in proc.stderr
    assert "testing-secret" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("bits", [8, 16])
def test_ingested_observations_keep_their_values(tmp_path, bits):
    arr = (np.random.default_rng(5).random((16, 16)) * 255).astype(np.uint8)
    write_tree(tmp_path / "src", {"a.png": png(arr)})
    ingest(str(tmp_path / "src"), str(tmp_path / "obs"), IngestConfig(bits=bits), progress=False)
    cell = pq.read_table(tmp_path / "obs").column("observation").to_pylist()[0]
    assert np.abs(to_float(decode_image(cell["bytes"])) - to_float(arr)).max() < 1e-6


def test_zip_sources_and_a_shrinking_source_leave_no_stale_shards(tmp_path):
    import zipfile

    rng = np.random.default_rng(6)
    blobs = {f"d/img{k}.png": png((rng.random((16, 16)) * 255).astype(np.uint8)) for k in range(5)}
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        for name, data in blobs.items():
            zf.writestr(f"./{name}", data)
        zf.writestr("./d/._img0.png", b"AppleDouble junk")  # hidden (a macOS resource fork): not an input
    cfg = IngestConfig(policy=POLICY, shard_size=2)
    out = ingest(str(tmp_path / "src.zip"), str(tmp_path / "obs"), cfg, progress=False)
    assert out["inputs"] == 5 and out["ingested"] == 5 and len(out["written"]) == 3
    assert sorted(pq.read_table(tmp_path / "obs").column("id").to_pylist()) == sorted(blobs)
    # the source shrinks to 3 files: shard 2 (inputs 4-5) must go, with its errors file and marker
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        for name in list(blobs)[:3]:
            zf.writestr(name, blobs[name])
    out = ingest(str(tmp_path / "src.zip"), str(tmp_path / "obs"), cfg, progress=False)
    assert out["removed"] == ["_done/shard-00002.json", "_errors/shard-00002.parquet", "shard-00002.parquet"]
    assert sorted(pq.read_table(tmp_path / "obs").column("id").to_pylist()) == sorted(blobs)[:3]


def test_a_changed_input_file_redoes_its_shard(tmp_path):
    rng = np.random.default_rng(7)
    write_tree(tmp_path / "src", {f"img{k}.png": png((rng.random((16, 16)) * 255).astype(np.uint8))
                                  for k in range(4)})
    cfg = IngestConfig(policy=POLICY, shard_size=2)
    ingest(str(tmp_path / "src"), str(tmp_path / "obs"), cfg, progress=False)
    write_tree(tmp_path / "src", {"img3.png": png((rng.random((16, 16)) * 255).astype(np.uint8))})  # new content
    again = ingest(str(tmp_path / "src"), str(tmp_path / "obs"), cfg, progress=False)
    assert again["written"] == ["shard-00001.parquet"] and again["skipped"] == ["shard-00000.parquet"]
