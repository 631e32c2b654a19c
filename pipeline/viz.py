"""Image grids for people to look at (sample sheets, before/after panels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.storage import makedirs, open_fs


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


def png_bytes(mosaic: np.ndarray) -> bytes:
    """An (H, W, C) uint8 mosaic as PNG bytes (grey when C is 1)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mosaic[:, :, 0] if mosaic.shape[2] == 1 else mosaic).save(buf, format="PNG")
    return buf.getvalue()


def save_png(mosaic: np.ndarray, uri: str | Path) -> None:
    fs, path = open_fs(str(uri))
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        makedirs(fs, parent)
    with fs.open(path, "wb") as f:
        f.write(png_bytes(mosaic))


def save_grid(images: np.ndarray, uri: str | Path, nrow: int = 8, scale: int = 2) -> None:
    save_png(grid(images, nrow=nrow, scale=scale), uri)


def loss_curve(losses: list[float], width: int = 480, height: int = 200, smooth: int = 25) -> np.ndarray:
    """A line plot of training losses (moving average over ``smooth`` steps, log scale) as an
    (H, W, 3) uint8 image; no plotting library needed."""
    from PIL import Image, ImageDraw

    v = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
    if smooth > 1 and len(v) >= smooth:
        v = np.convolve(v, np.ones(smooth) / smooth, mode="valid")
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    m = 24
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    pts = [(m + (width - 2 * m) * k / max(len(v) - 1, 1), height - m - (height - 2 * m) * (x - lo) / (hi - lo))
           for k, x in enumerate(v)]
    draw.rectangle([m, m, width - m, height - m], outline="grey")
    if len(pts) > 1:
        draw.line(pts, fill="navy", width=2)
    draw.text((m, 4), f"log10 loss {10**hi:.3g} .. {10**lo:.3g}, {len(losses)} steps", fill="black")
    return np.asarray(img)
