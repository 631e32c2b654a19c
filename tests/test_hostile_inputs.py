"""Hostile inputs to ingest and cleaning (issue 17): links out of the source, archive members that leave
the archive or are links, files that cost more memory than they should, contents echoed in reasons, and
finite values far outside any image's range. Each input is either used or rejected with a reason."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.ingest import IngestConfig, ingest
from pipeline.data.validate import ImagePolicy, RowError, conform
from tests.test_cli import jointdiff

ROOT = Path(__file__).resolve().parents[1]
SECRET = "TOKEN=hunter2-s3cr3t-do-not-echo"
MiB = 2**20


def _png(seed: int = 0, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _outcome(dst: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(ids kept, {id: (stage, reason)} of the errors table)."""
    kept = pq.read_table(dst, columns=["id"]).column("id").to_pylist() if list(dst.glob("*.parquet")) else []
    errors = {r["id"]: (r["stage"], r["reason"]) for r in pq.read_table(dst / "_errors").to_pylist()}
    return kept, errors


# ---------------------------------------------------------------- item 2: links out of SRC
def test_links_that_leave_src_are_not_followed_and_contents_are_never_echoed(tmp_path):
    outside, src = tmp_path / "outside", tmp_path / "src"
    (outside / "dir").mkdir(parents=True)
    (outside / "photo.png").write_bytes(_png(1))
    (outside / "token.png").write_bytes(f"{SECRET}\n".encode())
    (outside / "dir" / "inner.png").write_bytes(_png(2))
    (src / "sub").mkdir(parents=True)
    (src / "ok.png").write_bytes(_png(3))
    os.symlink("../outside/photo.png", src / "photo.png")  # an outside image: not ingested
    os.symlink(outside / "token.png", src / "token.png")  # an outside secret (absolute link)
    os.symlink("../../outside/photo.png", src / "sub" / "deep.png")  # leaves SRC from a subfolder
    os.symlink("../outside/dir", src / "linked")  # a folder outside: not walked into
    os.symlink("ok.png", src / "alias.png")  # stays inside SRC: followed
    os.symlink("sub", src / "again")  # a folder inside SRC: not walked (its files are there already)
    os.symlink("missing.png", src / "broken.png")
    os.mkfifo(src / "pipe.png")  # reading it would block the ingest forever
    proc = jointdiff("ingest", str(src), str(tmp_path / "obs"), "--shard-size", "3")
    kept, errors = _outcome(tmp_path / "obs")
    assert sorted(kept) == ["alias.png", "ok.png"]
    for name in ("photo.png", "token.png", "sub/deep.png", "linked"):
        assert errors[name] == ("read", "a link that leads outside the source folder; not followed"), name
    assert errors["again"] == ("read", "a link to a folder; not walked (its files are ingested by their own path)")
    assert errors["broken.png"] == ("read", "a link to nothing (broken)")
    assert errors["pipe.png"] == ("read", "a special file (fifo, socket or device); not read")
    assert not any(i.startswith("linked/") for i in kept + list(errors))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == 9 == summary["ingested"] + summary["errors"]
    everything = proc.stdout + proc.stderr + json.dumps(errors)
    assert "hunter2" not in everything and "TOKEN" not in everything


def test_no_reason_echoes_the_contents_of_a_file(tmp_path):
    """Text and binary junk under every image name the decoders take, and headers carrying the secret."""
    src = tmp_path / "src"
    src.mkdir()
    text = f"{SECRET}\n".encode()
    for ext in ("png", "jpg", "tif", "bmp", "webp", "npy"):
        (src / f"text.{ext}").write_bytes(text)
    (src / "binary.png").write_bytes(bytes(range(7, 256)) + text)
    (src / "magic.npy").write_bytes(b"\x93NUMPY\x01\x00" + (60).to_bytes(2, "little") + text.ljust(60))
    (src / "header.npy").write_bytes(b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") +
                                     (f"{{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), "
                                      f"'{SECRET}': 1}}").encode().ljust(117) + b"\n")
    good = _png(4)  # a PNG whose second chunk is named after the secret, with a checksum that fails
    (src / "chunk.png").write_bytes(good[:33] + (4).to_bytes(4, "big") + b"hUNt" + b"x" * 8 + good[33:])
    (src / "npy.png").write_bytes(_npy(np.zeros((4, 4), np.float32))[:10] + text)  # a .npy magic, then text
    ingest(str(src), str(tmp_path / "obs"), IngestConfig(), progress=False)
    kept, errors = _outcome(tmp_path / "obs")
    assert kept == [] and len(errors) == 11
    for name, (_stage, reason) in errors.items():
        assert "hunter2" not in reason and "TOKEN" not in reason and "hUNt" not in reason, (name, reason)
        assert "b'" not in reason and 'b"' not in reason, (name, reason)  # no bytes of the file at all
    assert errors["text.png"] == ("decode", f"text ({len(text)} bytes), not an image")
    assert errors["binary.png"][1] == f"not an image: {len(text) + 249} bytes in no format ingest reads"


# ---------------------------------------------------------------- item 3: archive members
def _zip_member(zf: zipfile.ZipFile, name: str, data: bytes, mode: int | None = None) -> None:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.create_system = 3  # unix: external_attr holds st_mode
        info.external_attr = mode << 16
    zf.writestr(info, data)


def test_every_zip_entry_is_ingested_or_rejected_with_a_reason(tmp_path):
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        _zip_member(zf, "a/ok.png", _png(5))
        _zip_member(zf, "../up.png", _png(6))
        _zip_member(zf, "a/../../x/up2.png", _png(7))
        _zip_member(zf, "/abs.png", _png(8))
        _zip_member(zf, "a/link.png", b"../../etc/passwd", stat.S_IFLNK | 0o777)
        _zip_member(zf, "a/fifo.png", b"", stat.S_IFIFO | 0o644)
        _zip_member(zf, "a/.DS_Store", b"hidden: not an input")
        _zip_member(zf, "__MACOSX/a/._ok.png", b"AppleDouble")
        _zip_member(zf, "a/", b"")  # a folder entry: not an input
        _zip_member(zf, "a/dir.png", _png(9), stat.S_IFDIR | 0o755)  # a folder mode on an entry with data
    out = ingest(str(tmp_path / "src.zip"), str(tmp_path / "obs"), IngestConfig(shard_size=2), progress=False)
    kept, errors = _outcome(tmp_path / "obs")
    assert kept == ["a/ok.png"]
    leaves = ("read", "path leaves the archive (an absolute path or a '..' part); not extracted")
    assert errors == {"../up.png": leaves, "a/../../x/up2.png": leaves, "/abs.png": leaves,
                      "a/link.png": ("read", "a symbolic link member (a link or special file); not followed"),
                      "a/fifo.png": ("read", "a fifo member (a link or special file); not followed"),
                      "a/dir.png": ("read", "a folder member (a link or special file); not followed")}
    # hidden files stay out of the inputs (documented), but are counted, never silently lost
    assert (out["inputs"], out["ingested"], out["errors"], out["hidden"]) == (7, 1, 6, 2)


def test_every_tar_member_is_ingested_or_rejected_with_a_reason(tmp_path):
    def member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(tmp_path / "src.tar.gz", "w:gz") as tf:
        member(tf, "d", kind=tarfile.DIRTYPE)  # a folder: not an input
        member(tf, "d/ok.png", _png(9))
        member(tf, "../up.png", _png(10))
        member(tf, "/abs.png", _png(11))
        member(tf, "d/sym.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        member(tf, "d/hard.png", kind=tarfile.LNKTYPE, link="d/ok.png")
        member(tf, "d/dev.png", kind=tarfile.CHRTYPE)
        member(tf, "d/.hidden.png", _png(12))
        member(tf, "d/later.png", _png(13))
    out = ingest(str(tmp_path / "src.tar.gz"), str(tmp_path / "obs"), IngestConfig(shard_size=4), progress=False)
    kept, errors = _outcome(tmp_path / "obs")
    assert kept == ["d/ok.png", "d/later.png"]  # a tar's inputs are in archive order
    leaves = ("read", "path leaves the archive (an absolute path or a '..' part); not extracted")
    assert errors == {"../up.png": leaves, "/abs.png": leaves,
                      "d/sym.png": ("read", "a symbolic link member (a link or special file); not followed"),
                      "d/hard.png": ("read", "a hard link member (a link or special file); not followed"),
                      "d/dev.png": ("read", "a character device member (a link or special file); not followed")}
    assert (out["inputs"], out["ingested"], out["errors"], out["hidden"]) == (7, 2, 5, 1)
    rows = pq.read_table(tmp_path / "obs" / "_errors").to_pylist()
    assert sorted((r["shard"], r["row"]) for r in rows) == [("shard-00000.parquet", 1), ("shard-00000.parquet", 2),
                                                           ("shard-00000.parquet", 3), ("shard-00001.parquet", 0),
                                                           ("shard-00001.parquet", 1)]


def test_a_tar_resumes_by_its_markers_and_redoes_only_a_changed_shard(tmp_path):
    def write(seeds, mtimes):
        with tarfile.open(tmp_path / "src.tgz", "w:gz") as tf:
            for k, (seed, mtime) in enumerate(zip(seeds, mtimes)):
                data = _png(seed)
                info = tarfile.TarInfo(f"img{k}.png")
                info.size, info.mtime = len(data), mtime
                tf.addfile(info, io.BytesIO(data))

    write([20, 21, 22, 23, 24], [1_700_000_000] * 5)
    cfg = IngestConfig(shard_size=2)
    first = ingest(str(tmp_path / "src.tgz"), str(tmp_path / "obs"), cfg, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "obs").glob("*.parquet")}
    assert first["written"] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    (tmp_path / "obs" / "_done" / "shard-00001.json").unlink()
    again = ingest(str(tmp_path / "src.tgz"), str(tmp_path / "obs"), cfg, progress=False)
    assert again["written"] == ["shard-00001.parquet"] and again["ingested"] == 5
    assert {p.name: p.read_bytes() for p in (tmp_path / "obs").glob("*.parquet")} == before
    write([20, 21, 22, 23, 99], [1_700_000_000] * 4 + [1_800_000_000])  # the last member changes: its shard is redone
    assert ingest(str(tmp_path / "src.tgz"), str(tmp_path / "obs"), cfg, progress=False)["written"] == [
        "shard-00002.parquet"]


# ---------------------------------------------------------------- item 4: what one file may cost
PROBE = textwrap.dedent("""
    import json, resource, sys
    from pipeline.data.ingest import IngestConfig, ingest
    from pipeline.data.validate import ImagePolicy
    warm, big, dst, max_bytes = sys.argv[1:5]
    cfg = IngestConfig(policy=ImagePolicy(max_bytes=int(max_bytes)))
    ingest(warm, dst + "-warm", cfg, progress=False)  # the same code paths once, on small files
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ingest(big, dst, cfg, progress=False)
    print(json.dumps({"growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024,
                      "ingested": out["ingested"], "errors": out["errors"]}))
""")


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read in pieces (an archive member written without holding it in memory)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _sparse(path: Path, head: bytes, size: int) -> None:
    with open(path, "wb") as f:  # a file of `size` bytes that occupies only its first block on disk
        f.write(head)
        f.truncate(size)


def _big_png_header(h: int, w: int) -> bytes:
    import zlib

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x00\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + \
        zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")


def _archive(path: Path, members: dict[str, bytes | int]) -> None:
    """A .tar.gz or .zip of ``members`` (an int stands for that many zero bytes, streamed in)."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                with zf.open(name, "w", force_zip64=True) as f:
                    if isinstance(data, int):
                        for _ in range(data // MiB):
                            f.write(bytes(MiB))
                    else:
                        f.write(data)
        return
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            tf.addfile(info, _Zeros(data) if isinstance(data, int) else io.BytesIO(data))


def _peak_growth(tmp_path: Path, warm: Path, big: Path, max_bytes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(warm), str(big), str(tmp_path / "obs"), str(max_bytes)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_a_file_over_max_bytes_is_refused_unread(tmp_path, kind):
    """policy.max_bytes = 1 MiB, a 20 MiB input (sparse on disk, or zeros compressed in an archive): the
    ingest's peak memory grows by less than 3x the limit, and the row says why."""
    big_name = "big.png"
    if kind == "folder":
        for name in ("warm", "big"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "a.png").write_bytes(_png(30))
        _sparse(tmp_path / "big" / big_name, _big_png_header(16, 16), 20 * MiB)
        warm, big = tmp_path / "warm", tmp_path / "big"
    else:
        warm, big = tmp_path / f"warm.{kind}", tmp_path / f"big.{kind}"
        _archive(warm, {"a.png": _png(30)})
        _archive(big, {"a.png": _png(30), big_name: 20 * MiB})
        assert big.stat().st_size < MiB
    got = _peak_growth(tmp_path, warm, big, MiB)
    assert (got["ingested"], got["errors"]) == (1, 1)
    assert got["growth"] < 3 * MiB, f"peak memory grew by {got['growth'] / MiB:.1f} MiB"
    errors = _outcome(tmp_path / "obs")[1]
    assert errors[big_name] == ("read", "20,971,520 bytes, over policy.max_bytes=1,048,576; not read "
                                        "(--set policy.max_bytes=20971520 to accept it)")


def test_too_many_pixels_is_refused_from_the_first_bytes(tmp_path):
    """A PNG and a .npy whose headers declare 20 megapixels, padded (sparsely) to 20 MiB and 80 MiB, under a
    max_bytes that lets them in: refused from their headers, before the rest of the file is read."""
    for name in ("warm", "big"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(_png(31))
    header = _npy_header((5000, 4000))
    _sparse(tmp_path / "big" / "wide.png", _big_png_header(5000, 4000), 20 * MiB)
    _sparse(tmp_path / "big" / "wide.npy", header, len(header) + 5000 * 4000 * 4)
    got = _peak_growth(tmp_path, tmp_path / "warm", tmp_path / "big", 128 * MiB)
    assert (got["ingested"], got["errors"]) == (1, 2)
    assert got["growth"] < 3 * MiB, f"peak memory grew by {got['growth'] / MiB:.1f} MiB"
    errors = _outcome(tmp_path / "obs")[1]
    for name in ("wide.png", "wide.npy"):
        assert errors[name] == ("decode", "image has 20,000,000 pixels, over the limit of 16,777,216 "
                                          "(--set policy.max_pixels=20000000 to accept it)"), name


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # the magic, the version and the header


def test_a_truncated_or_oversized_npy_is_refused_from_its_header(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "short.npy").write_bytes(_npy_header((16, 16)) + bytes(100))  # 1024 bytes declared
    (src / "deep.npy").write_bytes(_npy_header((4, 4, 100000), "|u1"))  # 100,000 channels
    (src / "ok.npy").write_bytes(_npy(np.full((16, 16), 0.25, np.float32)))
    ingest(str(src), str(tmp_path / "obs"), IngestConfig(), progress=False)
    kept, errors = _outcome(tmp_path / "obs")
    assert kept == ["ok.npy"]
    assert errors["short.npy"] == ("decode", "cannot decode .npy: its header declares 1,024 bytes of data, "
                                             "the file holds 100")
    assert errors["deep.npy"] == ("decode", "cannot decode .npy: shape (4, 4, 100000): expected (H, W) or (H, W, C) "
                                            "with C at most 4")


def test_a_cell_over_max_bytes_is_refused_undecoded():
    from pipeline.data.validate import decode_any

    with pytest.raises(RowError, match=r"^2,000 bytes, over policy\.max_bytes=1,000; not read \(--set policy\."
                                       r"max_bytes=2000 to accept it\)$"):
        decode_any(bytes(2000), "x.png", max_bytes=1000)


# ---------------------------------------------------------------- item 9: finite values far out of range
@pytest.mark.parametrize("value", [1e30, -1e30, 3.5, -1.5])
def test_values_out_of_range_are_rejected(value):
    arr = np.full((16, 16), 0.5, np.float32)
    arr[3, 4] = value
    with pytest.raises(RowError) as err:
        conform(arr, ImagePolicy())
    assert err.value.stage == "validate"
    assert err.value.reason == (f"1 value(s) outside [-1, 3] (found [{min(value, 0.5):.3g}, {max(value, 0.5):.3g}]); "
                                "images are in [0, 1], sums of two with read-out noise in [-1, 3]")


def test_values_an_observation_can_take_are_kept():
    arr = np.linspace(-0.9, 2.9, 256, dtype=np.float32).reshape(16, 16)  # y = x + n + noise, with margin
    assert np.array_equal(conform(arr, ImagePolicy())[0], arr)


def test_a_huge_observation_is_rejected_by_the_cleaning_path(tiny_priors, tmp_path):
    from pipeline.data.shards import list_parts
    from pipeline.run.local import run_local
    from tests.test_clean_job import _cfg, _edit_shard, _observations

    obs = str(tmp_path / "obs")
    _observations(obs, n=4, shard_size=4, bad_row=False)

    def spoil(rows):
        arr = np.full((16, 16, 1), 0.5, np.float32)
        arr[0, 0, 0] = 1e30
        rows[2]["observation"] = {"bytes": _npy(arr), "path": "x.npy"}
    _edit_shard(obs, "shard-00000.parquet", spoil)
    summary = run_local(obs, str(tmp_path / "out"), _cfg(tiny_priors, steps=2), progress=False)
    assert (summary["cleaned"], summary["errors"]) == (3, 1)
    errors = pq.read_table(list_parts(f"{summary['output']}/errors")[0]).to_pylist()
    assert [(e["row"], e["stage"]) for e in errors] == [(2, "validate")]
    assert errors[0]["reason"] == ("observation: 1 value(s) outside [-1, 3] (found [0.5, 1e+30]); images are in "
                                   "[0, 1], sums of two with read-out noise in [-1, 3]")


def test_archives_in_a_bucket_are_read_member_by_member(s3, tmp_path):
    """A tar.gz and a zip on S3 (read through seekable, buffered file objects, not fetched whole)."""
    from pipeline.data import storage

    bucket, _ = s3
    fs, _ = storage.open_fs(bucket)
    members = {"b.png": _png(40), "a.png": _png(41), "../up.png": _png(42)}
    for name in ("src.tar.gz", "src.zip"):
        _archive(tmp_path / name, members)
        fs.put_file(str(tmp_path / name), f"{bucket[5:]}/{name}")
        out = ingest(f"{bucket}/{name}", str(tmp_path / f"obs-{name}"), IngestConfig(), progress=False)
        kept, errors = _outcome(tmp_path / f"obs-{name}")
        assert (out["inputs"], out["ingested"]) == (3, 2)
        assert kept == (["b.png", "a.png"] if name.endswith(".tar.gz") else ["a.png", "b.png"])
        assert errors == {"../up.png": ("read", "path leaves the archive (an absolute path or a '..' part); "
                                                "not extracted")}


def test_a_folder_swapped_for_a_link_after_the_listing_does_not_lead_outside(tmp_path):
    from pipeline.data.sources import SWAPPED, open_source
    from pipeline.data.validate import ImagePolicy, RowError

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "x.png").write_bytes(_png(1))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes(_png(1))  # the same size: the listing cannot tell them apart
    with open_source(str(tmp_path / "src")) as reader:
        (source,) = reader.sources
        (tmp_path / "src" / "sub" / "x.png").unlink()
        (tmp_path / "src" / "sub").rmdir()
        (tmp_path / "src" / "sub").symlink_to(tmp_path / "outside")  # between the listing and the read
        with pytest.raises(RowError) as err:
            reader.read(source, ImagePolicy())
    assert err.value.reason == SWAPPED
