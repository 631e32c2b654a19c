"""Image grids for people to look at (sample sheets, before/after panels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.storage import open_fs


def grid(images: np.ndarray, nrow: int = 8, pad: int = 2, scale: int = 1, fill: float = 1.0) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (H', W', C) uint8 mosaic, ``nrow`` images per row."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    rows = (n + nrow - 1) // nrow
    out = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), fill, dtype=np.float32)
    for k in range(n):
        r, q = divmod(k, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    out = np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)
    return np.moveaxis(out, 0, -1)


def save_png(mosaic: np.ndarray, uri: str | Path) -> None:
    from PIL import Image

    fs, path = open_fs(str(uri))
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    img = Image.fromarray(mosaic[:, :, 0] if mosaic.shape[2] == 1 else mosaic)
    with fs.open(path, "wb") as f:
        img.save(f, format="PNG")


def save_grid(images: np.ndarray, uri: str | Path, nrow: int = 8, scale: int = 2) -> None:
    save_png(grid(images, nrow=nrow, scale=scale), uri)
