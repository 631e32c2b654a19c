"""Resolve a ``DataConfig`` to images: an embedded dataset name or a URI of image shards."""

from __future__ import annotations

import numpy as np

from pipeline.data.embedded import NAMES, ImageSet, load_embedded
from pipeline.data.shards import read_images
from pipeline.data.validate import ImagePolicy, RowError, conform


def load_images(source: str, split: str = "train", size: int = 32, channels: int = 1,
                column: str = "image") -> ImageSet:
    """Images in [0, 1], (N, C, size, size). ``source`` is an embedded name or a shard URI."""
    if source in NAMES:
        return load_embedded(source, split, size, channels)
    ids, arrays = read_images(source, column)
    # training images: any size is resized, alpha dropped, channels converted; non-finite is an error
    policy = ImagePolicy(size=size, channels=channels, resize="resize", alpha="drop", max_pixels=2**62)
    out = []
    for id_, arr in zip(ids, arrays):
        try:
            out.append(conform(arr, policy))
        except RowError as exc:
            raise ValueError(f"{source}: image {id_!r}: {exc.reason}") from None
    return ImageSet(ids, np.stack(out))
