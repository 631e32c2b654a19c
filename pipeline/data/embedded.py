"""Datasets that ship inside installed packages, so nothing is downloaded at run time.

| name      | source                                 | train         | val              | test               |
|-----------|----------------------------------------|---------------|------------------|--------------------|
| `faces`   | `skimage.data.lfw_subset()`, 100 faces | 0-69          | 70-79            | 80-99              |
| `digits`  | `sklearn.datasets.load_digits()`       | 0-1399        | 1400-1599        | 1600-1796          |
| `patches` | crops of scikit-image sample images    | 9 images x 64 | 2 images x 16    | 4 images x 16      |
| `stripes` | synthetic sinusoidal stripes           | seeds 0-4999  | seeds 1,000,000+ | seeds 2,000,000+   |
| `natural` | scikit-image's photos, native size     | 12 photos     | 2 photos         | 4 photos           |
| `text`    | RGBA text layers (:mod:`.text`)         | seeds 0-39999 | seeds 1,000,000+ | seeds 2,000,000+   |
| `font-digits` | typeset digits in a held-out font  | seeds 0-1399  | seeds 1,000,000+ | seeds 2,000,000+   |
| `stripes-fine` | stripes of 8-12 cycles a side     | seeds 0-4999  | seeds 1,000,000+ | seeds 2,000,000+   |

`patches` sources: train = moon, clock, hubble_deep_field, immunohistochemistry, grass, gravel,
brick, cell, retina; val = rocket, coins; test = camera, astronaut, coffee, chelsea. `stripes` val and
test have 500 images each; so do `text` val and test. `text` is 4 channels only (colour and coverage): crops of
random words in three font families, the fourth (:data:`pipeline.data.text.HELD_OUT`) kept out of every split.

`font-digits` and `stripes-fine` are noise that no prior was trained on (the out-of-distribution scenarios of
``bench quality``): the digits 0-9 set in DejaVu Serif (:data:`pipeline.data.text.HELD_OUT`), drawn as `digits` are
(white on black, an 8x8 raster enlarged), against `digits`' handwriting; and stripes finer than any in `stripes`
(:data:`STRIPES_FINE_CYCLES` against :data:`STRIPES_CYCLES`). `font-digits` val and test have 200 and 500
images, `stripes-fine` 500 each.

`natural` is split *by photo* (:data:`NATURAL_PHOTOS`), grey and RGB, at native resolution: train =
chelsea (also shipped as ``cat``), the stereo_motorcycle pair (left and right, one split), hubble_deep_field,
immunohistochemistry, retina, brick, cell, grass, gravel, microaneurysms, moon. Images that hold text or
are not photos are never used (:data:`NATURAL_EXCLUDED`). :func:`natural_photos` gives the whole photos
(patch training, the large-image benchmark); ``load_embedded("natural", ...)`` gives fixed crops of
``size`` x ``size`` cut at native resolution (64 per photo in train, 32 in val and test), not resized.

Splits are fixed index ranges (or, for `patches`, disjoint source images; for `stripes`, disjoint
seed ranges), so they are deterministic and disjoint by construction. Every image is resized to the
requested square size (bicubic, anti-aliased when shrinking, clipped to [0, 1]) and converted to the
requested channel count (grey is repeated to RGB; RGB becomes grey by ITU-R 601 luminance).
Ids are ``<name>-<split>-<index>`` with the index into the source (stable across sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

SPLITS = ("train", "val", "test")
NAMES = ("faces", "digits", "patches", "stripes", "natural", "text", "font-digits", "stripes-fine")

FACES_SPLITS = {"train": range(0, 70), "val": range(70, 80), "test": range(80, 100)}
DIGITS_SPLITS = {"train": range(0, 1400), "val": range(1400, 1600), "test": range(1600, 1797)}
PATCH_SOURCES = {
    "train": ("moon", "clock", "hubble_deep_field", "immunohistochemistry", "grass", "gravel",
              "brick", "cell", "retina"),
    "val": ("rocket", "coins"),
    "test": ("camera", "astronaut", "coffee", "chelsea"),
}
PATCHES_PER_SOURCE = {"train": 64, "val": 16, "test": 16}
NATURAL_PHOTOS = {
    "train": ("chelsea", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina", "brick",
              "cell", "grass", "gravel", "microaneurysms", "moon"),
    "val": ("rocket", "clock"),
    "test": ("astronaut", "coffee", "camera", "coins"),
}
# text, logos, drawings and synthetic images; `cat` is chelsea under another name
NATURAL_EXCLUDED = ("page", "text", "logo", "checkerboard", "horse", "shepp_logan_phantom", "colorwheel",
                    "binary_blobs", "lfw_subset", "cat")
NATURAL_CROPS = {"train": 64, "val": 32, "test": 32}
STRIPES_SPLITS = {"train": (0, 5000), "val": (1_000_000, 500), "test": (2_000_000, 500)}
TEXT_SPLITS = {"train": (0, 40000), "val": (1_000_000, 500), "test": (2_000_000, 500)}
# Stripe frequency in cycles per image side, so the pattern does not depend on the pixel size.
STRIPES_CYCLES = (1.5, 6.0)
STRIPES_FINE_CYCLES = (8.0, 12.0)  # `stripes-fine`: out of the stripes prior's range
FONT_DIGITS_SPLITS = {"train": (0, 1400), "val": (1_000_000, 200), "test": (2_000_000, 500)}


@dataclass
class ImageSet:
    """Images as float32 ``(N, C, S, S)`` in [0, 1] with one string id per image, or, for images kept at
    their own sizes, a list of ``(C, H, W)`` arrays."""

    ids: list[str]
    images: np.ndarray | list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, n: int | None) -> ImageSet:
        return self if n is None else ImageSet(self.ids[:n], self.images[:n])


def load_embedded(name: str, split: str = "train", size: int | None = 32, channels: int = 1,
                  n: int | None = None) -> ImageSet:
    """Load split ``split`` of embedded dataset ``name`` at ``size`` x ``size`` with ``channels``;
    ``size=None`` (``natural`` only): the whole photos at their own sizes, as a list."""
    if name not in NAMES:
        raise ValueError(f"unknown embedded dataset '{name}'; choose one of {', '.join(NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if (name == "text") != (channels == 4) or channels not in (1, 3, 4):
        raise ValueError("text layers have 4 channels (colour and coverage): ask for channels=4" if name == "text"
                         else f"channels must be 1 or 3, got {channels}")
    if size is None:
        if name != "natural":
            raise ValueError(f"embedded dataset '{name}' has no native size; give a size")
        photos = natural_photos(split)
        return ImageSet([i for i, _ in photos], [to_channels(p[None], channels)[0] for _, p in photos]).subset(n)
    if size < 4:
        raise ValueError(f"size must be at least 4, got {size}")
    if name == "text":  # drawn seed by seed (a second each for a thousand): only the first n
        ids, images = _text(split, size, n)
    else:
        ids, images = _LOADERS[name](split, size)
        images = to_channels(images, channels)
    return ImageSet(list(ids), np.ascontiguousarray(images, dtype=np.float32)).subset(n)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image in [0, 1] to (size, size[, C]), clipped to [0, 1]."""
    from skimage.transform import resize

    shrink = min(img.shape[:2]) > size
    out = resize(img, (size, size) + img.shape[2:], order=3, mode="reflect", anti_aliasing=shrink)
    return np.clip(out, 0.0, 1.0)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W) or (N, H, W, 3) -> (N, C, H, W): grey repeated to RGB, RGB to grey by luminance."""
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = np.moveaxis(images, -1, 1)
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    w = np.array([0.299, 0.587, 0.114], dtype=images.dtype)
    return np.tensordot(w, images, axes=([0], [1]))[:, None]


def grey_of(img: np.ndarray) -> np.ndarray:
    """One image ``(3, H, W)`` to grey ``(1, H, W)`` by ITU-R 601 luminance (:func:`to_channels`); an RGBA layer
    ``(4, H, W)`` (the composite's noise) to grey and alpha ``(2, H, W)``."""
    grey = to_channels(np.moveaxis(img[:3], 0, -1)[None], 1)[0]
    return np.concatenate([grey, img[3:]]) if img.shape[0] == 4 else grey


@lru_cache(maxsize=1)
def _lfw_faces() -> np.ndarray:
    from skimage.data import lfw_subset

    return lfw_subset()[:100]  # the first 100 of the 200 are faces, the rest are not


def _faces(split: str, size: int) -> tuple[list[str], np.ndarray]:
    idx = FACES_SPLITS[split]
    faces = _lfw_faces()
    return [f"faces-{split}-{i:05d}" for i in idx], np.stack([resize_square(faces[i], size) for i in idx])


@lru_cache(maxsize=1)
def _sk_digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images / 16.0


def _digits(split: str, size: int) -> tuple[list[str], np.ndarray]:
    idx = DIGITS_SPLITS[split]
    digits = _sk_digits()
    return [f"digits-{split}-{i:05d}" for i in idx], np.stack([resize_square(digits[i], size) for i in idx])


def _patches(split: str, size: int) -> tuple[list[str], np.ndarray]:
    import skimage.data
    from skimage.color import gray2rgb

    ids, out = [], []
    for s, src in enumerate(PATCH_SOURCES[split]):
        img = getattr(skimage.data, src)()
        img = img.astype(np.float64) / np.iinfo(img.dtype).max if img.dtype.kind == "u" else img.astype(np.float64)
        if img.ndim == 2:
            img = gray2rgb(img)
        img = img[..., :3]
        h, w = img.shape[:2]
        crop = min(h, w) // 4  # a quarter of the short side: objects, not just texture
        rng = np.random.default_rng(1000 + s + 100 * SPLITS.index(split))
        for k in range(PATCHES_PER_SOURCE[split]):
            y0, x0 = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            ids.append(f"patches-{split}-{src}-{k:03d}")
            out.append(resize_square(img[y0:y0 + crop, x0:x0 + crop], size))
    return ids, np.stack(out)


def stripe(seed: int, size: int, shape: tuple[int, int] | None = None,
           cycles_range: tuple[float, float] = STRIPES_CYCLES) -> np.ndarray:
    """One stripe image ``0.5 + 0.5 sin(2 pi f (u cos a + v sin a) + phase)`` from its seed, ``size`` x ``size``,
    ``f`` drawn from ``cycles_range`` (cycles per side); with ``shape`` (h, w), the same pattern (the same period in
    pixels) over an image of that shape."""
    rng = np.random.default_rng(seed)
    cycles = rng.uniform(*cycles_range)
    angle = rng.uniform(0.0, np.pi)
    phase = rng.uniform(0.0, 2 * np.pi)
    h, w = shape or (size, size)
    v, u = np.meshgrid(np.arange(h) / size, np.arange(w) / size, indexing="ij")
    return 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (u * np.cos(angle) + v * np.sin(angle)) + phase)


def _stripes(split: str, size: int, name: str = "stripes",
             cycles_range: tuple[float, float] = STRIPES_CYCLES) -> tuple[list[str], np.ndarray]:
    start, count = STRIPES_SPLITS[split]
    seeds = range(start, start + count)
    return ([f"{name}-{split}-{s:07d}" for s in seeds],
            np.stack([stripe(s, size, cycles_range=cycles_range) for s in seeds]))


def font_digit(seed: int) -> np.ndarray:
    """One digit (0-9, from the seed) set in the held-out font, drawn as ``load_digits`` draws its handwriting:
    white on black, 8x8, the glyph filling most of the raster at a random small slant and offset; [0, 1]."""
    from PIL import Image, ImageDraw

    from pipeline.data.text import HELD_OUT, font

    rng = np.random.default_rng(seed)
    canvas = Image.new("L", (64, 64), 0)
    f = font(HELD_OUT, int(rng.integers(70, 82)))  # a digit about 52-60 px high: the raster's height
    digit = str(int(rng.integers(10)))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=f, stroke_width=3)
    x = (64 - (right - left)) / 2 - left + rng.uniform(-3, 3)
    y = (64 - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
    draw.text((x, y), digit, fill=255, font=f, stroke_width=3, stroke_fill=255)  # a pen's width
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    small = np.asarray(canvas.resize((8, 8), Image.BOX), dtype=np.float64)
    return small / max(small.max(), 1.0)


def _font_digits(split: str, size: int) -> tuple[list[str], np.ndarray]:
    start, count = FONT_DIGITS_SPLITS[split]
    seeds = range(start, start + count)
    return [f"font-digits-{split}-{s:07d}" for s in seeds], np.stack([resize_square(font_digit(s), size)
                                                                      for s in seeds])


def _text(split: str, size: int, n: int | None = None) -> tuple[list[str], np.ndarray]:
    start, count = TEXT_SPLITS[split]
    seeds = range(start, start + (count if n is None else min(n, count)))
    return [f"text-{split}-{s:07d}" for s in seeds], _text_crops(seeds, size)


@lru_cache(maxsize=3)
def _text_crops(seeds: range, size: int) -> np.ndarray:
    from pipeline.data.text import text_crops

    return text_crops(seeds, size)


def _unit(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / np.iinfo(img.dtype).max if img.dtype.kind == "u" else img.astype(np.float32)


@lru_cache(maxsize=3)
def natural_photos(split: str) -> tuple[tuple[str, np.ndarray], ...]:
    """The ``natural`` photos of ``split`` at native size: ``(id, (H, W) or (H, W, 3) float32 in [0, 1])``."""
    import skimage.data

    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    out = []
    for name in NATURAL_PHOTOS[split]:
        img = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":  # (left, right, disparity): both views, one split
            out += [(f"natural-{split}-{name}-left", _unit(img[0])), (f"natural-{split}-{name}-right", _unit(img[1]))]
        else:
            out.append((f"natural-{split}-{name}", _unit(img)))
    return tuple(out)


def _natural(split: str, size: int) -> tuple[list[str], list[np.ndarray]]:
    ids, out = [], []
    for s, (id_, img) in enumerate(natural_photos(split)):
        rng = np.random.default_rng(5000 + s + 100 * SPLITS.index(split))
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
        h, w = img.shape[:2]
        if min(h, w) < size:
            raise ValueError(f"natural photos are at least {min(h, w)} pixels a side; ask for size <= {min(h, w)}")
        for k in range(NATURAL_CROPS[split]):
            y0, x0 = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            ids.append(f"{id_}-{k:03d}")
            out.append(img[y0:y0 + size, x0:x0 + size])
    return ids, np.stack(out)


_LOADERS = {"faces": _faces, "digits": _digits, "patches": _patches, "stripes": _stripes, "natural": _natural,
            "text": _text, "font-digits": _font_digits,
            "stripes-fine": partial(_stripes, name="stripes-fine", cycles_range=STRIPES_FINE_CYCLES)}
