"""What a user meets when a run cannot clean their rows (docs/errors.md): the checks before any work,
the verdict on a run that rejected too many rows (exit 4), and ingested photos as training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tests.test_cli import _tiny_yaml, jointdiff

PHOTOS = {"chelsea.png": "chelsea", "coffee.jpg": "coffee", "colorwheel.png": "colorwheel", "rocket.jpg": "rocket"}


def _photos(folder: Path) -> Path:
    """A few of scikit-image's sample photos as a user has them: RGB PNG and JPEG files at their native sizes."""
    from skimage import data

    folder.mkdir(parents=True)
    for name, what in PHOTOS.items():
        Image.fromarray(getattr(data, what)()).save(folder / name)
    return folder


def _ingested(tmp_path: Path) -> Path:
    jointdiff("ingest", str(_photos(tmp_path / "photos")), str(tmp_path / "obs"), "--quiet")
    return tmp_path / "obs"


def test_an_ingested_folder_trains_a_prior_and_becomes_a_test_set_with_truth(tmp_path):
    from pipeline.data.datasets import load_images
    from pipeline.data.shards import decode_image, to_float

    obs = _ingested(tmp_path)
    cfg = _tiny_yaml(tmp_path, steps=2, every=2)
    jointdiff("train", "--config", str(cfg), "--quiet", "--set", f"data.source={obs}")
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["meta"]
    assert meta["dataset"] == str(obs) and meta["n_train_images"] == len(PHOTOS) and meta["steps"] == 2

    jointdiff("corrupt", str(obs), "digits", str(tmp_path / "test"), "--size", "16")
    test = pq.read_table(tmp_path / "test").to_pylist()
    truth = load_images(str(obs), size=16, channels=1)
    assert sorted(r["id"].split("+")[0] for r in test) == sorted(truth.ids)  # one per photo, truth kept
    for r in test:
        clean = to_float(decode_image(r["clean"]["bytes"], r["clean"]["path"]))
        assert np.abs(clean - truth.images[truth.ids.index(r["id"].split("+")[0])]).max() <= 1 / 255 + 1e-6

    # a test set has both corrupted images and their truth: which to train on must be said
    proc = jointdiff("train", "--config", str(cfg), "--quiet", "--set", f"data.source={tmp_path / 'test'}",
                     check=False)
    last = proc.stderr.strip().splitlines()[-1]  # after the "training prior ..." line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and last.startswith("jointdiff: "), proc.stderr
    assert "have 'observation' and 'clean'" in last
    assert "choose one with --set data.column=clean or --set data.column=observation" in proc.stderr
    proc = jointdiff("train", "--config", str(cfg), "--quiet", "--set", f"data.source={tmp_path / 'test'}",
                     "--set", "data.column=image", check=False)
    assert proc.returncode == 2 and "no column 'image' (the shards have id, observation, clean" in proc.stderr
