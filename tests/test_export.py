"""``jointdiff export``: a run's cleaned images out as PNG files named by row id, at the source's bit depth.

Two runs in one output root, one over 8-bit observations with hostile ids (path separators, ``..``,
control characters, a 300-byte id, ids that come out the same once made safe), one over 16-bit
observations. Expected pixels are computed here from the run's cleaned Parquet.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import CleanConfig, SamplerConfig
from pipeline.data.corrupt import corrupt
from pipeline.data.embedded import load_embedded
from pipeline.data.shards import decode_image, write_dataset
from pipeline.export import MAX_NAME_BYTES, safe_names
from pipeline.run.local import run_local
from tests.conftest import cli

HOSTILE = ["../escape", "sub/dir/x", "a\\b", "a_b", "ctrl\x01id\nnext", "..", ".hidden", "é" * 150, "plain-1"]


def _observations(uri: str, ids: list[str], bits: int) -> None:
    obs = corrupt(load_embedded("faces", "test", 16), load_embedded("digits", "test", 16), len(ids), seed=3)
    write_dataset(uri, ids, {"observation": obs.observation, "clean": obs.clean}, bits={"observation": bits},
                  extra={"alpha": pa.array([0.5] * len(ids), pa.float32())}, shard_size=4)


@pytest.fixture(scope="module")
def out(tiny_priors, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = CleanConfig(priors={"image": tiny_priors[0], "noise": tiny_priors[1]}, sampler=SamplerConfig(steps=2),
                      batch_size=4, device="cpu")
    _observations(str(root / "obs16"), [f"img-{k}" for k in range(3)], bits=16)
    _observations(str(root / "obs8"), HOSTILE, bits=8)
    r16 = run_local(str(root / "obs16"), str(root / "out"), cfg, progress=False)
    r8 = run_local(str(root / "obs8"), str(root / "out"), cfg, progress=False)  # the newer run
    return {"root": root, "out": root / "out", "r8": r8["run_id"], "r16": r16["run_id"]}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cleaned(run: Path, column: str) -> dict[str, dict]:
    return {r["id"]: r[column] for r in pq.read_table(run / "cleaned").to_pylist()}


def _bit_depth(png: bytes) -> int:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return png[24]


def test_export_writes_8_bit_pngs_named_by_safe_ids_and_only_inside_dir(out, tmp_path, capsys):
    run = out["out"] / "runs" / out["r8"]
    before = _tree(out["root"])
    dest = tmp_path / "pictures"
    proc = cli(capsys, "export", str(run), str(dest), "--noise")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == len(HOSTILE) and result["bits"] == {"8": len(HOSTILE)}
    assert _tree(out["root"]) == before  # nothing written next to the run or anywhere else
    with open(dest / "export.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(HOSTILE)  # every id once, exactly as stored
    files = {r["file"] for r in rows}
    assert _tree(dest) == files | {f"noise/{n}" for n in files} | {"noise", "export.csv"}
    for name in files:
        assert name.endswith(".png") and len(name.encode()) <= MAX_NAME_BYTES and not name.startswith(".")
        assert "/" not in name and "\\" not in name and ".." not in name and name.isprintable()
    by_id = {r["id"]: r for r in rows}
    assert by_id["plain-1"]["file"] == "plain-1.png" and by_id["sub/dir/x"]["file"] == "sub_dir_x.png"
    assert by_id["a\\b"]["file"] != by_id["a_b"]["file"] and by_id["a_b"]["file"].startswith("a_b~")  # hashed
    assert by_id["ctrl\x01id\nnext"]["file"] == "ctrl%01id%0Anext.png"
    denoised, noise = _cleaned(run, "denoised"), _cleaned(run, "noise_estimate")
    for r in rows:
        for column, cells, path in (("denoised", denoised, dest / r["file"]),
                                    ("noise", noise, dest / r["noise_file"])):
            data = path.read_bytes()
            assert _bit_depth(data) == 8 and r["bits"] == "8", (column, r)
            v16 = decode_image(cells[r["id"]]["bytes"]).astype(np.float64)  # cleaned/ stores 16-bit PNG
            got = np.asarray(Image.open(io.BytesIO(data)))
            assert got.dtype == np.uint8 and np.array_equal(got, np.rint(v16 * 255 / 65535)), (column, r["id"])


def test_an_output_root_exports_its_newest_run_or_the_one_named_at_the_source_depth(out, tmp_path, capsys):
    proc = cli(capsys, "export", str(out["out"]), str(tmp_path / "newest"))  # no --quiet: a progress bar
    assert f"run {out['r8']}, the newest of 2 runs" in proc.stderr and "img/s" in proc.stderr
    assert json.loads(proc.stdout)["run"] == str(out["out"] / "runs" / out["r8"])

    cli(capsys, "export", str(out["out"]), str(tmp_path / "r16"), "--run-id", out["r16"], "--quiet")
    cells = _cleaned(out["out"] / "runs" / out["r16"], "denoised")
    with open(tmp_path / "r16" / "export.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(cells) and {r["bits"] for r in rows} == {"16"}
    for r in rows:  # 16 bits in, 16 out: the stored PNG, byte for byte
        assert (tmp_path / "r16" / r["file"]).read_bytes() == cells[r["id"]]["bytes"]


def test_a_wrong_run_is_one_line_naming_the_path_and_what_was_expected(out, tmp_path, capsys):
    from pipeline.cli import main

    cases = [(tmp_path / "nope", [], "no such folder"),
             (out["root"] / "obs8", [], "not a run folder (OUTPUT/runs/RUN_ID"),
             (out["out"], ["--run-id", "run-000"], f"its runs are {', '.join(sorted([out['r8'], out['r16']]))}")]
    for path, extra, expected in cases:
        code = main(["export", str(path), str(tmp_path / "dest"), *extra])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"jointdiff export: error: {path}: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "dest").exists()


def test_exported_files_drop_an_image_extension_unless_two_ids_would_meet():
    from pipeline.export import file_names

    ids = ["cat.jpg", "scan.TIFF", "dup.jpg", "dup.png", "twin.png", "twin", "notes.txt", ".png", "../up.jpeg",
           "Case.jpg", "case.png"]
    assert file_names(ids) == {"cat.jpg": "cat.png", "scan.TIFF": "scan.png", "dup.jpg": "dup.jpg.png",
                               "dup.png": "dup.png.png", "twin.png": "twin.png.png", "twin": "twin.png",
                               "notes.txt": "notes.txt.png", ".png": "_png.png", "../up.jpeg": "___up.png",
                               "Case.jpg": "Case.jpg.png", "case.png": "case.png.png"}


def test_safe_names_are_unique_short_plain_file_names():
    ids = HOSTILE + ["x" * 500, "x" * 501, "%01", "\x01", "", "a~" + "0" * 8, "/", "\\"]
    names = safe_names(ids)
    assert len(set(names)) == len(ids)
    for name in names:
        assert 0 < len(name.encode()) <= MAX_NAME_BYTES and name.isprintable() and os.sep not in name
        assert not name.startswith(".") and ".." not in name
    assert names[ids.index("x" * 500)] != names[ids.index("x" * 501)]  # cut to the same prefix: hashed apart
    assert safe_names(["é" * 150])[0].encode().decode("utf-8")  # cut on a character boundary
