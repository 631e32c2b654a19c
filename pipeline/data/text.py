"""Text layers: RGBA overlays of random words, the noise of the composited overlay (forward.Composite).

A layer is ``(4, H, W)`` float32 in [0, 1]: the text's colour ``c`` (RGB) and its antialiased coverage ``m``
(alpha, with each word's opacity in it), what an editor or a watermarking tool puts over a photo. Where no word
covers a pixel its colour is the colour of the word drawn first (a flat colour: the prior need not learn a colour
that the overlay never shows).

Each layer comes from its seed: 1 to 4 words (random letters with English frequencies, some capitalised, some
digits), each in a random font family (:data:`FAMILIES`), size (:data:`SIZES` pixels), position, angle (most
level, some up to 35 degrees), colour (white, black or a random colour) and opacity (0.55 to 1). The families are
Pillow's bundled scalable font and the DejaVu Sans, Sans Mono and Serif that ship in matplotlib
(``pip install 'jointdiff[bench]'``); :data:`HELD_OUT` (DejaVu Serif) is never in a training layer, so a test
can ask for text the ``text`` prior has not seen (issue 16's out-of-distribution scenario).

``load_embedded("text", split, size, 4)`` (:mod:`pipeline.data.embedded`) gives ``size`` x ``size`` crops, cut
anywhere, of layers drawn at six times that size with 2 to 8 strings: a caption's density over a photo (at size 32,
two crops in three hold some text and the mean coverage is about 0.09, as over `bench large`'s photos). A prior
trained on crops centred on text expects text nearly everywhere, and the joint sampler then explains a photo's
dark regions as black letters.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

FAMILIES = ("pillow", "dejavu-sans", "dejavu-mono", "dejavu-serif")
HELD_OUT = "dejavu-serif"
TRAIN_FAMILIES = tuple(f for f in FAMILIES if f != HELD_OUT)
SIZES = (12, 48)  # font size in pixels (the height of a capital is about 0.7 of it)
_FILES = {"dejavu-sans": "DejaVuSans.ttf", "dejavu-mono": "DejaVuSansMono.ttf", "dejavu-serif": "DejaVuSerif.ttf"}
# English letter frequencies (percent), a-z
_FREQ = np.array([8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4, 6.7, 7.5, 1.9, 0.095, 6.0,
                  6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074])
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def _font_dir() -> str:
    try:
        import matplotlib
    except ImportError:
        from pipeline.untrusted import ConfigError

        raise ConfigError("text layers need the DejaVu fonts that ship with matplotlib: "
                          "pip install 'jointdiff[bench]' (or pip install matplotlib)") from None
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@lru_cache(maxsize=512)
def font(family: str, size: int):  # noqa: ANN201 - a PIL FreeTypeFont
    """The scalable font of ``family`` at ``size`` pixels."""
    from PIL import ImageFont

    if family == "pillow":
        return ImageFont.load_default(size=size)
    if family not in _FILES:
        raise ValueError(f"unknown font family {family!r}; choose one of {', '.join(FAMILIES)}")
    return ImageFont.truetype(os.path.join(_font_dir(), _FILES[family]), size)


def word(rng: np.random.Generator) -> str:
    """A random word: 2 to 9 letters with English frequencies, sometimes capitalised, sometimes a number."""
    if rng.random() < 0.12:
        return str(int(rng.integers(1, 10 ** int(rng.integers(1, 5)))))
    s = "".join(rng.choice(_LETTERS, int(rng.integers(2, 10)), p=_FREQ / _FREQ.sum()))
    r = rng.random()
    return s.upper() if r < 0.15 else s.capitalize() if r < 0.5 else s


def _colour(rng: np.random.Generator) -> np.ndarray:
    r = rng.random()
    if r < 0.35:
        return np.ones(3)
    if r < 0.55:
        return np.zeros(3)
    return rng.random(3)


def text_layer(seed: int, shape: tuple[int, int], families: tuple[str, ...] = TRAIN_FAMILIES,
               words: tuple[int, int] = (1, 4)) -> np.ndarray:
    """The text layer of ``seed`` over an image of ``shape`` (h, w): ``(4, h, w)`` float32, colour then coverage."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = shape
    colour = np.zeros((3, h, w), np.float32)
    cover = np.zeros((h, w), np.float32)
    for k in range(int(rng.integers(words[0], words[1] + 1))):
        text = " ".join(word(rng) for _ in range(int(rng.integers(1, 4))))
        f = font(str(rng.choice(families)), int(rng.integers(SIZES[0], SIZES[1] + 1)))
        left, top, right, bottom = f.getbbox(text)
        pad = 4
        tile = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        ImageDraw.Draw(tile).text((pad - left, pad - top), text, fill=255, font=f)
        if rng.random() < 0.3:
            tile = tile.rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC, expand=True)
        m = np.asarray(tile, np.float32) / 255.0 * float(rng.uniform(0.55, 1.0))
        th, tw = m.shape
        y0 = int(rng.integers(-th // 2, max(h - th // 2, 1)))
        x0 = int(rng.integers(-tw // 2, max(w - tw // 2, 1)))
        ys, xs = slice(max(y0, 0), min(y0 + th, h)), slice(max(x0, 0), min(x0 + tw, w))
        part = m[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        if part.size == 0:
            continue
        rgb = _colour(rng).astype(np.float32)
        if k == 0:
            colour[:] = rgb[:, None, None]
        # "over" compositing of this word onto the layer so far
        below = cover[ys, xs]
        out = part + below * (1 - part)
        mix = np.where(out > 0, part / np.maximum(out, 1e-6), 0.0)
        colour[:, ys, xs] = mix * rgb[:, None, None] + (1 - mix) * colour[:, ys, xs]
        cover[ys, xs] = out
    return np.concatenate([colour, cover[None]])


CROP_LAYER = 6  # crops are cut from layers of CROP_LAYER times their size a side
CROP_WORDS = (2, 8)  # strings per layer


def text_crops(seeds: range, size: int, families: tuple[str, ...] = TRAIN_FAMILIES) -> np.ndarray:
    """``(N, 4, size, size)`` crops, one per seed, cut anywhere in layers of :data:`CROP_LAYER` times ``size`` a
    side with :data:`CROP_WORDS` strings (see the module docstring)."""
    out = np.empty((len(seeds), 4, size, size), np.float32)
    side = CROP_LAYER * size
    for i, s in enumerate(seeds):
        layer = text_layer(s, (side, side), families, words=CROP_WORDS)
        y0, x0 = (int(v) for v in np.random.default_rng((s, 1)).integers(0, side - size + 1, 2))
        out[i] = layer[:, y0:y0 + size, x0:x0 + size]
    return out
