"""Files as cameras, scanners and editors write them: EXIF orientation, 16-bit colour TIFF, ICC profiles,
multi-frame files. One small file per case, written here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.validate import RowError, decode_any


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full((h, w), 128)], -1).astype(np.uint8)


def test_exif_orientation_is_applied():
    img = _gradient(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", exif=exif)
    out = decode_any(buf.getvalue(), "phone.png")
    assert out.shape == (20, 10, 3)
    assert np.array_equal(out, np.rot90(img, k=-1))


def test_a_16bit_colour_tiff_keeps_its_16_bits():
    import tifffile

    img = (np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 1000 + 7)  # not multiples of 257
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    out = decode_any(buf.getvalue(), "scan.tif")
    assert out.dtype == np.uint16 and np.array_equal(out, img)
    # Pillow alone reads it as 8-bit RGB: the cut this path avoids
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "RGB"


def test_an_icc_profile_is_converted_to_srgb():
    from PIL import ImageCms

    img = _gradient(6, 9)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", icc_profile=srgb)
    out = decode_any(buf.getvalue(), "tagged.png")
    assert out.shape == img.shape and np.abs(out.astype(int) - img).max() <= 1  # sRGB to sRGB: the same numbers
    # a profile that does not parse leaves the numbers as stored
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", icc_profile=b"not a profile")
    assert np.array_equal(decode_any(buf.getvalue(), "bad-profile.png"), img)


@pytest.mark.parametrize("fmt,ext", [("GIF", "gif"), ("TIFF", "tif")])
def test_a_multi_frame_file_is_rejected_with_a_reason(fmt, ext):
    frames = [Image.fromarray(_gradient(8, 8)), Image.fromarray(255 - _gradient(8, 8))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(RowError, match=f"{fmt} with 2 frames; only single-frame images are read"):
        decode_any(buf.getvalue(), f"anim.{ext}")
    # one frame is an image as any other
    buf = io.BytesIO()
    frames[0].save(buf, fmt)
    assert decode_any(buf.getvalue(), f"still.{ext}").shape[:2] == (8, 8)


def test_ingest_records_each_files_format_bits_and_orientation(tmp_path):
    import polars as pl
    import tifffile
    from PIL import Image

    from pipeline.data.ingest import ingest

    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_gradient(10, 20)).save(src / "phone.jpg", exif=exif, quality=95)
    tifffile.imwrite(src / "scan.tif", np.full((4, 5, 3), 1234, np.uint16))
    np.save(src / "array.npy", np.full((6, 6), 0.5, np.float32))
    assert ingest(str(src), str(tmp_path / "obs"), progress=False)["ingested"] == 3
    got = pl.read_parquet(tmp_path / "obs" / "shard-00000.parquet").sort("id")
    assert got.select("id", "source_format", "source_bits", "orientation_applied").rows() == [
        ("array.npy", "NPY", 32, 1), ("phone.jpg", "JPEG", 8, 6), ("scan.tif", "TIFF", 16, 1)]
    phone = Image.open(io.BytesIO(got.filter(pl.col("id") == "phone.jpg")["observation"][0]["bytes"]))
    assert phone.size == (10, 20)  # upright: 10 wide, 20 high
