"""Resolve a ``DataConfig`` to images: an embedded dataset name or a URI of image shards."""

from __future__ import annotations

import numpy as np

from pipeline.data.embedded import NAMES, ImageSet, load_embedded, resize_square, to_channels
from pipeline.data.shards import read_images, to_float


def load_images(source: str, split: str = "train", size: int = 32, channels: int = 1,
                column: str = "image") -> ImageSet:
    """Images in [0, 1], (N, C, size, size). ``source`` is an embedded name or a shard URI."""
    if source in NAMES:
        return load_embedded(source, split, size, channels)
    ids, arrays = read_images(source, column)
    out = []
    for id_, arr in zip(ids, arrays):
        img = to_float(arr)[:3]  # drop alpha
        if img.shape[1:] != (size, size):
            img = np.moveaxis(resize_square(np.moveaxis(img, 0, -1), size), -1, 0)
        if img.shape[0] != channels:
            img = to_channels(np.moveaxis(img, 0, -1)[None] if img.shape[0] == 3 else img, channels)[0]
        if not np.all(np.isfinite(img)):
            raise ValueError(f"{source}: image {id_!r} has non-finite values")
        out.append(img.astype(np.float32))
    return ImageSet(ids, np.stack(out))
