"""Rows of an observation shard: decoded, checked and converted to what the priors take, or rejected with a
reason (:class:`~pipeline.data.validate.RowError`: the stage and why, one error row each).

Also :func:`peek_image`: an image's size and channels from its header alone, for the checks a run makes
before any work (:func:`pipeline.run.plan.check_inputs`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ForwardConfig
from pipeline.data.validate import ImagePolicy, RowError, conform, decode_any, npy_header
from pipeline.forward import FORWARD_MODELS, make_forward
from pipeline.posterior.estimate import ESTIMABLE


@dataclass
class Row:
    """One input row ready to sample: its index in the shard, id, observation and (when the shard has it) ground
    truth, as float32 ``(C, H, W)`` in [0, 1] (the sum model's observation in [0, 2]), and its blend weight."""

    row: int
    id: str
    y: np.ndarray
    clean: np.ndarray | None
    alpha: float  # the weight given (forward.alpha or the row's alpha column), NaN where none is known
    grey: bool = False  # a grey image cleaned by RGB priors (as R = G = B): its results go back to grey
    alpha_plane: np.ndarray | None = None  # the input's alpha (policy.alpha=keep), put back on the cleaned image
    estimate: bool = False  # the weight is estimated by the sampler (forward.alpha auto, or a blend without one)

    @property
    def pixels(self) -> int:
        return int(self.y.shape[-2] * self.y.shape[-1])


def decode_cell(cell: Any, what: str, policy: ImagePolicy, channels: int) -> np.ndarray:
    """One stored image (``{bytes, path}``) as a ``(channels, H, W)`` array at its own size under ``policy``,
    or ``(1, H, W)`` for a grey image and RGB priors, followed by its alpha channel when the policy keeps it;
    :class:`RowError` otherwise."""
    if cell is None:
        raise RowError("decode", f"{what} is null")
    if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
        raise RowError("decode", f"{what} is a {type(cell).__name__}, not an image struct {{bytes, path}}")
    try:
        img = conform(decode_any(cell["bytes"], cell.get("path") or "", policy.decode_pixels, policy.max_bytes), policy)
    except RowError as exc:
        raise RowError(exc.stage, f"{what}: {exc.reason}") from None
    if img.shape[0] - (img.shape[0] in (2, 4)) not in (channels, 1):  # the policy converts or rejects: a bug guard
        raise RowError("validate", f"{what} has {img.shape[0]} channel(s) but the priors take {channels}")
    return img


Rejected = tuple[int, Any, RowError]  # (row, id as stored, why)


def decode_rows(cols: Mapping[str, list[Any]], policy: ImagePolicy, channels: int,
                forward: ForwardConfig, duplicates: Mapping[int, str]) -> tuple[list[Row], list[Rejected]]:
    """The shard's columns as :class:`Row` s, and ``(row, id, error)`` for each row rejected: no id, a later copy
    of an id (``duplicates``: row -> reason), an image that does not decode or fit, a weight that is there and
    invalid, or missing where the model's weight cannot be estimated (``forward.alpha`` wins over the row's
    ``alpha`` column; a blend's missing weight, or every row's under ``forward.alpha: auto``, is estimated by the
    sampler: :attr:`Row.estimate`)."""
    rows: list[Row] = []
    rejected: list[Rejected] = []
    truth = cols.get("clean")
    alphas = cols.get("alpha")
    for row, id_ in enumerate(cols["id"]):
        if id_ is None or row in duplicates:
            rejected.append((row, id_, RowError("validate", "missing id" if id_ is None else duplicates[row])))
            continue
        try:
            cell = cols["observation"][row]
            y = decode_cell(cell, "observation", policy, channels)
            y, kept = (y[:-1], y[-1:]) if y.shape[0] in (2, 4) else (y, None)
            clean = decode_cell(truth[row], "clean", policy, channels) if truth and truth[row] else None
            clean = clean[:-1] if clean is not None and clean.shape[0] in (2, 4) else clean
            if clean is not None and clean.shape != y.shape:
                raise RowError("validate", f"clean is {clean.shape[1]}x{clean.shape[2]} but the observation is "
                                           f"{y.shape[1]}x{y.shape[2]}")
        except RowError as exc:
            rejected.append((row, id_, exc))
            continue
        alpha, estimate = 0.0, False  # the sum has no weight
        weight = FORWARD_MODELS[forward.name].weight
        if weight is not None:
            auto = forward.alpha == "auto"
            alpha = None if auto else forward.alpha
            if alpha is None:
                alpha = alphas[row] if alphas else None
            why = "" if alpha is None or math.isnan(alpha) else None
            if why is None:
                try:
                    make_forward(forward.name, 1, **{weight: alpha})
                except ValueError as exc:
                    why = f" ({exc})"
            # a weight that is missing is estimated (a blend's); one that is there and wrong is the row's error
            estimate = auto or (why == "" and forward.name in ESTIMABLE)
            if why is not None and not estimate:
                cannot = "" if why else f" (the {forward.name} model's weight cannot be estimated)"
                rejected.append((row, id_, RowError("validate", f"{forward.name} needs the noise's weight: the row's "
                                                                f"alpha column has {alpha!r}{why} and forward.alpha "
                                                                f"is not set{cannot}")))
                continue
            if why is not None:
                alpha = math.nan
        grey = y.shape[0] == 1 and channels == 3  # cleaned as R = G = B, returned grey
        if grey:
            y = np.repeat(y, 3, axis=0)
            clean = None if clean is None else np.repeat(clean[:1], 3, axis=0)
        rows.append(Row(row, str(id_), y, clean, float(alpha), grey=grey, alpha_plane=kept, estimate=estimate))
    return rows, rejected


def peek_image(cell: Any) -> tuple[int, int, int, bool, int] | None:
    """``(height, width, colour channels, has alpha, pixels)`` of a stored image from its header, or None
    when the header does not tell (the row is left to the cleaner, which rejects it if it must)."""
    if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
        return None
    data, name = cell["bytes"], cell.get("path") or ""
    try:
        if name.endswith(".npy") or data[:6] == b"\x93NUMPY":
            shape = npy_header(data)[0]
            if len(shape) not in (2, 3):
                return None
            c = 1 if len(shape) == 2 else int(shape[2])
            h, w = int(shape[0]), int(shape[1])
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:  # the header only; no pixels are decoded
                w, h = im.size
                # channels as decode_any gives them: palette to RGB(A), other modes (CMYK, YCbCr...) to RGB
                c = 4 if im.mode == "P" and "transparency" in im.info else {"L": 1, "1": 1, "I": 1, "F": 1, "I;16": 1,
                                                                            "I;16B": 1, "I;16L": 1, "LA": 2,
                                                                            "RGBA": 4}.get(im.mode, 3)
    except Exception:
        return None
    alpha = c in (2, 4)
    return h, w, c - 1 if alpha else c, alpha, h * w
