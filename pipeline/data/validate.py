"""Decoding and validating one image before it reaches a model, with a declared conversion policy.

:func:`read_limited` reads one input file (or archive member) with the :class:`ImagePolicy`'s bounds:
larger than ``max_bytes`` is refused unread, and more pixels than ``max_pixels`` is refused from the
header in the first bytes, before the rest is read. :func:`decode_any` reads PNG, JPEG, TIFF, BMP, WebP
(8/16 bit, grey, RGB, with or without alpha) and ``.npy`` arrays, checking the same bounds before it
decodes. :func:`conform` turns the decoded array into the ``(C, H, W)`` float32 a prior expects, or says
why not: non-finite values or values no image can hold, a size or channel count that the policy does
not allow to be converted. Every failure is a :class:`RowError` carrying the stage (``read``, ``decode``
or ``validate``) and a reason a person can act on; callers put it in the errors table and go on with
the next row.

A reason never quotes the file: it describes the data (``text (53 bytes), not an image``), and a
decoder's own message, which may quote the bytes it choked on, is reduced to what went wrong.
"""

from __future__ import annotations

import io
from typing import IO, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.embedded import resize_square, to_channels
from pipeline.data.shards import decode_image, decoder_failure, to_float

# the errors table (docs/concepts/outputs.md): one row per rejected input row; row -1: a whole unreadable shard
ERRORS_SCHEMA = pa.schema([("run_id", pa.string()), ("dataset", pa.string()), ("shard", pa.string()),
                           ("row", pa.int64()), ("id", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])

DOWNSCALE_LIMIT = 16  # policy.oversize=downscale decodes images of at most this many times max_pixels
PEEK_BYTES = 64 * 1024  # the first bytes read for a header: PNG, JPEG, WebP, BMP and .npy say their size there
# Values an observation can hold, in image units: images are in [0, 1], the blend stays there and the sum
# y = x + n lies in [0, 2]; the margin of 1 is ten times the largest read-out noise in use (sigma_y <= 0.1),
# so an observation outside it is not an image at all (an unscaled sensor dump, 1e30 from a bad writer).
VALUE_RANGE = (-1.0, 3.0)
NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def error_row(run_id: str, dataset: str, shard: str, row: int, id_: object, stage: str, reason: str) -> dict:
    """One row of the errors table (:data:`ERRORS_SCHEMA`)."""
    return {"run_id": run_id, "dataset": dataset, "shard": shard, "row": row,
            "id": None if id_ is None else str(id_), "stage": stage, "reason": reason}


class RowError(ValueError):
    """One row cannot be used; ``stage`` is where it failed (read, decode, validate, sample)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class ImagePolicy(BaseModel):
    """What to do with images that are not already the expected size and channel count, and what one
    image may cost to read."""

    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(None, ge=4, description="square size to produce (None: keep as is)")
    channels: Literal[1, 3] | None = Field(None, description="channels to produce (None: keep as is)")
    resize: Literal["error", "resize", "center-crop"] = Field(
        "error", description="another size: reject it, resize it (squashing non-square images), "
                             "or crop the central square and resize that")
    convert_channels: bool = Field(True, description="grey to RGB by copying, RGB to grey by luminance")
    alpha: Literal["keep", "drop", "white", "black", "error"] = Field(
        "keep", description="images with an alpha channel: keep it (the colour is cleaned, the alpha is put back on "
                            "the cleaned image), drop it, composite over white/black, or reject")
    max_pixels: int = Field(16_777_216, ge=1, description="reject larger images from their header, undecoded "
                                                          "(4096 x 4096); see oversize")
    oversize: Literal["refuse", "downscale"] = Field(
        "refuse", description="an image over max_pixels: refuse it from its header, or decode it (up to "
                              f"{DOWNSCALE_LIMIT} times max_pixels) and shrink it, aspect kept, to fit max_pixels")
    max_bytes: int = Field(256 * 2**20, ge=1, description="reject larger files, archive members and cells "
                                                          "unread (256 MiB)")

    def identity(self) -> dict[str, Any]:
        """What of the policy goes into run and ingest ids: every setting, less ``max_bytes`` and ``oversize``
        at their defaults (settings added after ids were first made: the ids of runs that leave them alone stay
        as they were)."""
        out = self.model_dump(mode="json")
        for key in ("max_bytes", "oversize"):
            if out[key] == type(self).model_fields[key].default:
                out.pop(key)
        return out

    @property
    def decode_pixels(self) -> int:
        """The most pixels an image may have to be decoded at all: ``max_pixels``, or with ``oversize:
        downscale`` :data:`DOWNSCALE_LIMIT` times that (a decompression bomb is still refused unread)."""
        return self.max_pixels * (DOWNSCALE_LIMIT if self.oversize == "downscale" else 1)


def too_many_bytes(size: int, max_bytes: int, stage: str = "read") -> RowError:
    return RowError(stage, f"{size:,} bytes, over policy.max_bytes={max_bytes:,}; not read "
                           f"(--set policy.max_bytes={size} to accept it)")


def too_many_pixels(pixels: int, max_pixels: int) -> RowError:
    return RowError("decode", f"image has {pixels:,} pixels, over the limit of {max_pixels:,} "
                              f"(--set policy.max_pixels={pixels} to accept it)")


def read_limited(f: IO[bytes], name: str, policy: ImagePolicy, size: int | None = None) -> bytes:
    """The bytes of one input, read from ``f`` within the policy's bounds: refused unread when its listed
    ``size`` is over ``max_bytes``, refused after the first :data:`PEEK_BYTES` when the header declares more
    than ``max_pixels``, and never more than ``max_bytes + 1`` bytes read whatever the listing said. Read
    in pieces, so an input costs at most twice its size while it is read."""
    if size is not None and size > policy.max_bytes:
        raise too_many_bytes(size, policy.max_bytes)
    limit = policy.max_bytes + 1 if size is None else min(policy.max_bytes, size) + 1  # one byte past shows a lie
    head = f.read(min(PEEK_BYTES, limit))
    pixels = peek_pixels(head, name)
    if pixels is not None and pixels > policy.decode_pixels:
        raise too_many_pixels(pixels, policy.decode_pixels)
    pieces, n = [head], len(head)
    while n < limit:
        piece = f.read(min(2**20, limit - n))
        if not piece:
            break
        pieces.append(piece)
        n += len(piece)
    if n > policy.max_bytes:
        raise RowError("read", f"more than {policy.max_bytes:,} bytes, over policy.max_bytes={policy.max_bytes:,}; "
                               "not read (--set policy.max_bytes=... to accept it)")
    if size is not None and n != size:
        raise RowError("read", f"{n:,} bytes where {size:,} were listed: the file changed while it was read; "
                               "run the ingest again")
    return head if len(pieces) == 1 else b"".join(pieces)


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, offset of the data)`` from the header of ``.npy`` bytes (the header alone is read);
    ``ValueError`` when it cannot be read, with a message that does not quote it."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    try:
        version = fmt.read_magic(buf)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _fortran, dtype = read(buf)
    except Exception:
        raise ValueError("its header cannot be read") from None
    return tuple(int(d) for d in shape), dtype, buf.tell()


def _png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk, the first 24 bytes (whatever follows)."""
    if len(data) >= 24 and data[:8] == PNG_MAGIC and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def peek_pixels(data: bytes, name: str = "") -> int | None:
    """Pixel count from the header alone, which may be all that ``data`` holds of the file (None when
    the format does not tell, or not in these bytes)."""
    if name.endswith(".npy") or data[:6] == NPY_MAGIC:
        try:
            shape = npy_header(data)[0]
        except ValueError:
            return None
        return int(shape[0] * shape[1]) if len(shape) >= 2 else None
    png = _png_size(data)
    if png is not None:
        return png[0] * png[1]
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return None


_SIGNATURES = {PNG_MAGIC: "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP",
               b"GIF8": "GIF"}
_OTHER_KINDS = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "gzip data", b"%PDF": "a PDF document",
                b"\x7fELF": "an executable", b"BZh": "bzip2 data", b"\xfd7zXZ": "xz data"}


def describe_data(data: bytes) -> str:
    """What ``data`` is, without quoting it: ``text (53 bytes), not an image``, ``a zip archive (1,024
    bytes), not an image``, ``not an image: 300 bytes in no format ingest reads``."""
    n = len(data)
    for magic, kind in _OTHER_KINDS.items():
        if data.startswith(magic):
            return f"{kind} ({n:,} bytes), not an image"
    import codecs

    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:4096], final=n <= 4096)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\n\r\f\v" for c in text):
        return f"text ({n:,} bytes), not an image"
    return f"not an image: {n:,} bytes in no format ingest reads"


def _decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` array, its header checked before any data is read: a shape an image can have, a
    dtype an image can have, and as many bytes as the header declares."""
    try:
        shape, dtype, offset = npy_header(data)
    except ValueError as exc:
        raise RowError("decode", f"cannot decode .npy: {exc}") from None
    if len(shape) not in (2, 3) or min(shape) < 1 or (len(shape) == 3 and shape[2] > 4):
        raise RowError("decode", f"cannot decode .npy: shape {shape}: expected (H, W) or (H, W, C) with C at most 4")
    if dtype.kind not in "fu" or dtype.hasobject:
        raise RowError("decode", f"cannot decode .npy: dtype {dtype.str}: expected float or unsigned integers")
    declared = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != declared:
        raise RowError("decode", f"cannot decode .npy: its header declares {declared:,} bytes of data, the file "
                                 f"holds {len(data) - offset:,}")
    try:
        return decode_image(data, ".npy")
    except Exception as exc:
        raise RowError("decode", f"cannot decode .npy: {decoder_failure(exc)}") from None


def decode_any(data: bytes | None, name: str = "", max_pixels: int = 16_777_216,
               max_bytes: int | None = None) -> np.ndarray:
    """``(H, W[, C])`` array in its stored dtype; alpha is kept (C = 2 or 4) for :func:`conform`.
    More than ``max_bytes`` bytes or ``max_pixels`` pixels (from the header) is refused undecoded."""
    if data is None or len(data) == 0:
        raise RowError("decode", "empty file (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise too_many_bytes(len(data), max_bytes, "decode")
    pixels = peek_pixels(data, name)
    if pixels is not None and pixels > max_pixels:
        raise too_many_pixels(pixels, max_pixels)
    if data[:6] == NPY_MAGIC:
        return _decode_npy(data)
    if name.endswith(".npy"):
        raise RowError("decode", describe_data(data))
    is_png16 = data[:8] == PNG_MAGIC and len(data) > 24 and data[24] == 16
    # 16-bit PNG through the shard decoder (pypng keeps 16 bits); 8-bit PNG through Pillow below, which
    # keeps a grey image's alpha channel for the policy
    if is_png16:
        try:
            return decode_image(data, name)
        except Exception as exc:
            raise RowError("decode", f"cannot decode PNG: {decoder_failure(exc)}") from None
    from PIL import Image, UnidentifiedImageError

    kind = _kind(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and kind != "JPEG":  # a phone's MPO JPEG: the first frame is the photo itself
                raise RowError("decode", f"{kind or 'image'} with {frames} frames; only single-frame images are "
                                         "read (save each frame as its own file)")
            if kind == "TIFF" and _tiff_is_16bit_colour(data):
                return _decode_tiff16(data)
            im.load()
            im = _upright_srgb(im)
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
        if kind is None:
            raise RowError("decode", describe_data(data)) from None
        raise RowError("decode", f"cannot decode {kind}: damaged or unsupported data") from None
    except RowError:
        raise
    except Exception as exc:
        raise RowError("decode", f"cannot decode {kind or 'image'}: {decoder_failure(exc)}") from None


# what ingest records of each source file beside its pixels
SOURCE_COLUMNS = {"source_format": pa.string(), "source_bits": pa.int32(), "orientation_applied": pa.int32()}


def _kind(data: bytes) -> str | None:
    """The image format its first bytes announce (PNG, JPEG, TIFF, BMP, GIF, WebP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((k for m, k in _SIGNATURES.items() if data.startswith(m)), None)


def source_info(data: bytes, arr: np.ndarray) -> dict[str, Any]:
    """What a decoded file was: its format (PNG, JPEG, TIFF, BMP, GIF, WebP, NPY), bits per sample as
    decoded (8, 16, or 32 for float), and the EXIF orientation that decoding applied (1: none)."""
    kind = "NPY" if data[:6] == NPY_MAGIC else _kind(data)
    orientation = 1
    if kind not in (None, "NPY"):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
    bits = 32 if arr.dtype.kind == "f" else 8 * arr.dtype.itemsize
    return {"source_format": kind, "source_bits": bits, "orientation_applied": orientation}


def _upright_srgb(im: Any) -> Any:
    """The image as it is meant to be seen: its EXIF orientation applied (a phone photo taken upright is
    stored sideways with a tag), and, when it carries an ICC colour profile, converted to sRGB through it
    (a CMYK or Adobe RGB file is not read as if its numbers were sRGB). The profile is not kept."""
    from PIL import ImageCms, ImageOps

    im = ImageOps.exif_transpose(im)
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            alpha = im.getchannel("A") if im.mode == "RGBA" else None
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            grey = im.mode == "L"
            out = ImageCms.profileToProfile(im.convert("RGB") if im.mode == "RGBA" else im, src, dst,
                                            outputMode="L" if grey else "RGB")
            if out is not None:
                im = out
                if alpha is not None:
                    im.putalpha(alpha)
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a profile that does not parse, or does not fit the mode: the numbers as stored
    return im


def _tiff_is_16bit_colour(data: bytes) -> bool:
    """A TIFF of 16-bit samples and 3 or 4 of them per pixel: what Pillow would cut to 8 bits."""
    try:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            page = tf.pages[0]
            return page.bitspersample == 16 and page.samplesperpixel in (3, 4)
    except Exception:
        return False


def _decode_tiff16(data: bytes) -> np.ndarray:
    import tifffile

    arr = tifffile.imread(io.BytesIO(data))
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise RowError("decode", f"16-bit TIFF of shape {arr.shape}: expected (H, W, 3) or (H, W, 4)")
    return arr.astype(np.uint16)


def shrink_to(img: np.ndarray, max_pixels: int) -> np.ndarray:
    """``(C, H, W)`` shrunk (anti-aliased, aspect kept) to the largest size of at most ``max_pixels`` pixels."""
    from skimage.transform import resize

    c, h, w = img.shape
    scale = (max_pixels / (h * w)) ** 0.5
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    while nh * nw > max_pixels:
        nh, nw = (nh - 1, nw) if nh >= nw else (nh, nw - 1)
    out = resize(np.moveaxis(img, 0, -1), (nh, nw), order=3, mode="reflect", anti_aliasing=True)
    return np.moveaxis(np.clip(out, img.min(), img.max()), -1, 0).astype(np.float32)


def conform(arr: np.ndarray, policy: ImagePolicy) -> np.ndarray:
    """The decoded array as ``(C, H, W)`` float32 per ``policy``; integers are scaled to [0, 1]. With
    ``policy.alpha == "keep"`` an image's alpha channel follows its colour channels (C = 2 or 4)."""
    if arr.ndim not in (2, 3):
        raise RowError("validate", f"array of shape {arr.shape}: expected (H, W) or (H, W, C)")
    img = to_float(arr)  # (C, H, W)
    if not np.all(np.isfinite(img)):
        bad = int((~np.isfinite(img)).sum())
        raise RowError("validate", f"{bad} NaN or infinite value(s)")
    lo, hi = float(img.min()), float(img.max())
    if lo < VALUE_RANGE[0] or hi > VALUE_RANGE[1]:
        bad = int(((img < VALUE_RANGE[0]) | (img > VALUE_RANGE[1])).sum())
        raise RowError("validate", f"{bad} value(s) outside [-1, 3] (found [{lo:.3g}, {hi:.3g}]); images are in "
                                   "[0, 1], sums of two with read-out noise in [-1, 3]")
    c = img.shape[0]
    if c in (2, 4) and policy.alpha == "keep":  # the colour under the policy, the alpha beside it, alike in size
        colour = conform(arr[..., :-1], policy.model_copy(update={"alpha": "drop"}))
        alpha = conform(arr[..., -1], policy.model_copy(update={"alpha": "drop", "channels": None}))
        return np.concatenate([colour, alpha])
    if c in (2, 4):  # grey + alpha, RGB + alpha
        if policy.alpha == "error":
            raise RowError("validate", "image has an alpha channel "
                                       "(--set policy.alpha=keep, drop, white or black to convert it)")
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
    if policy.size is None and h * w > policy.max_pixels:
        if policy.oversize != "downscale":
            raise too_many_pixels(h * w, policy.max_pixels)
        img = shrink_to(img, policy.max_pixels)
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
