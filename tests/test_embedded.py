"""Embedded datasets: shapes, ranges, and fixed, disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.embedded import NAMES, SPLITS, load_embedded


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint_deterministic_and_in_range(name):
    channels = 4 if name == "text" else 1  # text layers: colour and coverage
    n = 2000 if name == "text" else None  # 40,000 training layers take minutes to draw; their seeds are disjoint
    sets = {s: load_embedded(name, s, size=16, channels=channels, n=n) for s in SPLITS}
    ids = {s: set(d.ids) for s, d in sets.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    for s, d in sets.items():
        assert len(set(d.ids)) == len(d)
        assert d.images.shape == (len(d), channels, 16, 16) and d.images.dtype == np.float32
        assert d.images.min() >= 0.0 and d.images.max() <= 1.0
        again = load_embedded(name, s, size=16, channels=channels, n=n)
        assert again.ids == d.ids and np.array_equal(again.images, d.images)
    # no test image is a copy of a training image (content, not only ids)
    train = sets["train"].images.reshape(len(sets["train"]), -1)
    test = sets["test"].images
    if name == "text":  # a crop without text is one flat colour, which any split may draw: compare the text
        test = test[test[:, 3].max((1, 2)) > 0.2]
    for img in test.reshape(len(test), -1)[:50]:
        assert np.abs(train - img).max(1).min() > 1e-6


def test_documented_split_sizes():
    assert [len(load_embedded("faces", s)) for s in SPLITS] == [70, 10, 20]
    assert [len(load_embedded("digits", s)) for s in SPLITS] == [1400, 200, 197]
    patches = {s: load_embedded("patches", s) for s in SPLITS}
    sources = {s: {i.split("-")[2] for i in d.ids} for s, d in patches.items()}
    assert not sources["train"] & sources["test"] and not sources["val"] & sources["test"]
    assert sources["test"] == {"camera", "astronaut", "coffee", "chelsea"}


def test_channels_and_sizes():
    rgb = load_embedded("patches", "test", size=64, channels=3, n=4)
    assert rgb.images.shape == (4, 3, 64, 64)
    grey_faces = load_embedded("faces", "test", size=32, channels=3, n=2)
    assert np.array_equal(grey_faces.images[:, 0], grey_faces.images[:, 2])  # grey repeated


def test_stripes_are_sinusoids():
    s = load_embedded("stripes", "val", size=32, n=3).images
    # a pure sinusoid 0.5 + 0.5 sin(...) spans most of [0, 1] and has mean close to 0.5
    assert np.all(s.reshape(3, -1).max(1) > 0.9) and np.all(s.reshape(3, -1).min(1) < 0.1)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        load_embedded("celeba")
    with pytest.raises(ValueError, match="unknown split"):
        load_embedded("faces", "validation")


def _cycles(img: np.ndarray) -> float:
    """The dominant frequency of a 2-D pattern, in cycles per image side."""
    f = np.abs(np.fft.fft2(img - img.mean()))
    fy, fx = np.unravel_index(f.argmax(), f.shape)
    fy, fx = min(fy, img.shape[0] - fy), min(fx, img.shape[1] - fx)
    return float(np.hypot(fy, fx))


def test_the_out_of_distribution_noise_lies_outside_training():
    # stripes-fine: every test pattern finer than every training stripe (1.5-6 cycles a side; 8-12 here)
    fine = load_embedded("stripes-fine", "test", size=64, n=40).images[:, 0]
    train = load_embedded("stripes", "train", size=64, n=200).images[:, 0]
    assert min(_cycles(x) for x in fine) > max(_cycles(x) for x in train) + 1
    # font-digits: typeset glyphs, drawn as the handwriting is (white on black, filling the raster), yet each one
    # farther from its nearest handwritten training digit than a handwritten test digit is
    import torch

    from pipeline.training import nearest_distances

    hand = torch.from_numpy(load_embedded("digits", "train", 16, 1).images)
    typed = torch.from_numpy(load_embedded("font-digits", "test", 16, 1, n=100).images)
    held = torch.from_numpy(load_embedded("digits", "test", 16, 1, n=100).images)
    assert abs(float(typed.mean()) - float(held.mean())) < 0.15
    assert float(nearest_distances(typed, hand)[0].median()) > 1.2 * float(nearest_distances(held, hand)[0].median())
