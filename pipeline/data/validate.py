"""Decoding and validating one image before it reaches a model, with a declared conversion policy.

:func:`decode_any` reads PNG, JPEG, TIFF, BMP, WebP (8/16 bit, grey, RGB, with or without alpha) and
``.npy`` arrays, refusing an image larger than ``max_pixels`` from its header, before decoding it.
:func:`conform` turns the decoded array into the ``(C, H, W)`` float32 a prior expects, or says why
not: non-finite values, a size or channel count that the :class:`ImagePolicy` does not allow to be
converted. Every failure is a :class:`RowError` carrying the stage (``decode`` or ``validate``) and a
reason a person can act on; callers put it in the errors table and go on with the next row.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.embedded import resize_square, to_channels
from pipeline.data.shards import decode_image, to_float

# the errors table (DESIGN.md): one row per rejected input row; row -1 stands for a whole unreadable shard
ERRORS_SCHEMA = pa.schema([("run_id", pa.string()), ("dataset", pa.string()), ("shard", pa.string()),
                           ("row", pa.int64()), ("id", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])


def error_row(run_id: str, dataset: str, shard: str, row: int, id_: object, stage: str, reason: str) -> dict:
    """One row of the errors table (:data:`ERRORS_SCHEMA`)."""
    return {"run_id": run_id, "dataset": dataset, "shard": shard, "row": row,
            "id": None if id_ is None else str(id_), "stage": stage, "reason": reason}


class RowError(ValueError):
    """One row cannot be used; ``stage`` is where it failed (decode, validate, sample)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class ImagePolicy(BaseModel):
    """What to do with images that are not already the expected size and channel count."""

    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(None, ge=4, description="square size to produce (None: keep as is)")
    channels: Literal[1, 3] | None = Field(None, description="channels to produce (None: keep as is)")
    resize: Literal["error", "resize", "center-crop"] = Field(
        "error", description="another size: reject it, resize it (squashing non-square images), "
                             "or crop the central square and resize that")
    convert_channels: bool = Field(True, description="grey to RGB by copying, RGB to grey by luminance")
    alpha: Literal["drop", "white", "black", "error"] = Field(
        "drop", description="images with an alpha channel: drop it, composite over white/black, or reject")
    max_pixels: int = Field(16_777_216, ge=1, description="reject larger images unread (4096 x 4096)")


def peek_pixels(data: bytes, name: str = "") -> int | None:
    """Pixel count from the header alone (None when the format does not tell)."""
    if name.endswith(".npy") or data[:6] == b"\x93NUMPY":
        try:
            buf = io.BytesIO(data)
            version = np.lib.format.read_magic(buf)
            shape, _, _ = np.lib.format._read_array_header(buf, version)  # header only, no data read
        except Exception:
            return None
        return int(shape[0] * shape[1]) if len(shape) >= 2 else None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return None


def decode_any(data: bytes | None, name: str = "", max_pixels: int = 16_777_216) -> np.ndarray:
    """``(H, W[, C])`` array in its stored dtype; alpha is kept (C = 2 or 4) for :func:`conform`."""
    if data is None or len(data) == 0:
        raise RowError("decode", "empty file (0 bytes)")
    pixels = peek_pixels(data, name)
    if pixels is not None and pixels > max_pixels:
        raise RowError("decode", f"image has {pixels:,} pixels, over the limit of {max_pixels:,} "
                                 "(raise policy.max_pixels to accept it)")
    is_png16 = data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16
    # 16-bit PNG and .npy through the shard decoder (pypng keeps 16 bits); 8-bit PNG through Pillow
    # below, which keeps a grey image's alpha channel for the policy
    if is_png16 or name.endswith(".npy") or data[:6] == b"\x93NUMPY":
        try:
            arr = decode_image(data, name)
        except Exception as exc:
            raise RowError("decode", f"cannot decode {'PNG' if is_png16 else '.npy'}: {exc}") from None
        return arr
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im).astype(np.uint16)
            elif im.mode == "I":
                arr = np.asarray(im)
                if arr.min() < 0 or arr.max() > 65535:
                    raise RowError("decode", f"32-bit integer image with values in [{arr.min()}, {arr.max()}]; "
                                             "store it as 8/16-bit or as float .npy")
                return arr.astype(np.uint16)
            elif im.mode == "F":
                return np.asarray(im).astype(np.float32)
            elif im.mode not in ("L", "LA", "RGB", "RGBA"):
                im = im.convert("RGB")
            return np.asarray(im)
    except UnidentifiedImageError:
        raise RowError("decode", f"not an image file that can be read (starts with {data[:12]!r})") from None
    except RowError:
        raise
    except Exception as exc:
        kind = "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image"
        raise RowError("decode", f"cannot decode {kind}: {exc}") from None


def conform(arr: np.ndarray, policy: ImagePolicy) -> np.ndarray:
    """The decoded array as ``(C, H, W)`` float32 per ``policy``; integers are scaled to [0, 1]."""
    if arr.ndim not in (2, 3):
        raise RowError("validate", f"array of shape {arr.shape}: expected (H, W) or (H, W, C)")
    img = to_float(arr)  # (C, H, W)
    if not np.all(np.isfinite(img)):
        bad = int((~np.isfinite(img)).sum())
        raise RowError("validate", f"{bad} NaN or infinite value(s)")
    c = img.shape[0]
    if c in (2, 4):  # grey + alpha, RGB + alpha
        if policy.alpha == "error":
            raise RowError("validate", "image has an alpha channel "
                                       "(--set policy.alpha=drop, white or black to convert it)")
        colour, a = img[:-1], img[-1:]
        img = colour if policy.alpha == "drop" else colour * a + (1.0 - a) * (1.0 if policy.alpha == "white" else 0.0)
        c -= 1
    if c not in (1, 3):
        raise RowError("validate", f"{c} channels: expected 1 (grey) or 3 (RGB)")
    if policy.channels is not None and c != policy.channels:
        if not policy.convert_channels:
            raise RowError("validate", f"{c} channel(s) but {policy.channels} expected "
                                       "(--set policy.convert_channels=true to convert)")
        img = to_channels(np.moveaxis(img, 0, -1)[None] if c == 3 else img, policy.channels)[0]
    h, w = img.shape[1:]
    if policy.size is not None and (h, w) != (policy.size, policy.size):
        if policy.resize == "error":
            raise RowError("validate", f"{h}x{w} pixels but {policy.size}x{policy.size} expected "
                                       "(--set policy.resize=resize or policy.resize=center-crop to convert)")
        if policy.resize == "center-crop":
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            img = img[:, top:top + s, left:left + s]
        img = np.moveaxis(resize_square(np.moveaxis(np.clip(img, 0, 1), 0, -1), policy.size), -1, 0)
    return np.ascontiguousarray(img, dtype=np.float32)
