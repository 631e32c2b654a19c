"""A network trained on ``tile`` x ``tile`` patches, evaluated on images of any size: overlapping tiles,
blended with window weights, at an offset that the caller moves at every step (so no seam stays put).

:class:`Tiling` places the tiles over an ``H`` x ``W`` image: origins every ``stride = tile - overlap``
pixels starting at ``-offset`` (``0 <= offset < stride`` on each axis), enough of them to cover the image;
the image is padded by reflection so that tiles hanging over its border see mirrored content, and what
the network says about the padding is dropped. Each tile's output is weighted by a separable window
(``sin^2``, never below :data:`WINDOW_FLOOR` so that a pixel covered only by tile edges still has a
weight) and the weighted sum is divided by the sum of the weights: a constant network output comes back
exactly constant, whatever the offsets.

:func:`tiled` evaluates a network tile batch by tile batch (memory is bounded by ``batch`` tiles, not by
the image; tiles are taken from the image through the reflection, :meth:`Tiling.gather`, with no padded copy)
without building a graph; :func:`tiled_vjp` gives ``J^T c``, the vector-Jacobian product of the
blended output with a cotangent ``c`` of the image's size, again one tile batch at a time (each batch
re-evaluates its tiles with a graph and is freed before the next). An image that is exactly one tile is
the network itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WINDOW_FLOOR = 1e-3


def reflect_pad(z: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Pad the last two dimensions by reflection, also by more than the image's own size (reflecting the
    padded image again); along a one-pixel side the pixel is repeated instead. Differentiable."""
    while top or bottom:
        h = z.shape[-2]
        t, b = (top, bottom) if h == 1 else (min(top, h - 1), min(bottom, h - 1))
        z = F.pad(z, (0, 0, t, b), mode="replicate" if h == 1 else "reflect")
        top, bottom = top - t, bottom - b
    while left or right:
        w = z.shape[-1]
        lft, r = (left, right) if w == 1 else (min(left, w - 1), min(right, w - 1))
        z = F.pad(z, (lft, r, 0, 0), mode="replicate" if w == 1 else "reflect")
        left, right = left - lft, right - r
    return z


def window(tile: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(tile, tile)`` blending window: ``sin^2(pi (u + 1/2) / tile)`` per axis, at least :data:`WINDOW_FLOOR`."""
    u = torch.sin(math.pi * (torch.arange(tile, dtype=torch.float32, device=device) + 0.5) / tile) ** 2
    return (u[:, None] * u[None, :]).clamp_min(WINDOW_FLOOR)


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile`` pixels overlapping by ``overlap`` over an ``(h, w)`` image, shifted by ``offset``."""

    h: int
    w: int
    tile: int
    overlap: int
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, {self.tile}), got {self.overlap}")
        if not all(0 <= o < self.stride for o in self.offset):
            raise ValueError(f"tile offsets must be in [0, {self.stride}), got {self.offset}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def single(self) -> bool:
        """The image is exactly one tile: the network runs on it as it is."""
        return self.h == self.tile and self.w == self.tile

    def _starts(self, size: int, offset: int) -> list[int]:
        if size <= self.tile and offset == 0:
            return [0]
        starts, s = [], -offset
        while True:
            starts.append(s)
            if s + self.tile >= size:
                return starts
            s += self.stride

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Each tile's top-left corner in image coordinates (may be negative: over the padding)."""
        return [(y, x) for y in self._starts(self.h, self.offset[0]) for x in self._starts(self.w, self.offset[1])]

    def _pads(self) -> tuple[int, int, int, int]:
        ys, xs = self._starts(self.h, self.offset[0]), self._starts(self.w, self.offset[1])
        return -ys[0], ys[-1] + self.tile - self.h, -xs[0], xs[-1] + self.tile - self.w

    def pad(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` padded by reflection so that every tile lies inside it."""
        return reflect_pad(z, *self._pads())

    def cut(self, zp: torch.Tensor, origins: list[tuple[int, int]], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tiles at ``origins`` of every image of the padded batch ``zp`` (tile-major within an image),
        with each tile's time."""
        top, _, left, _ = self._pads()
        tiles = torch.stack([zp[:, :, y + top:y + top + self.tile, x + left:x + left + self.tile]
                             for y, x in origins], 1)
        return tiles.flatten(0, 1), t.repeat_interleave(len(origins))

    def _index(self, start: int, size: int, device: torch.device) -> torch.Tensor:
        """The image rows (or columns) that a tile starting at ``start`` sees: :func:`reflect_pad`'s reflection
        (periodic, so also beyond the image's own size; a one-pixel side repeats)."""
        i = torch.arange(start, start + self.tile, device=device)
        if size == 1:
            return torch.zeros_like(i)
        period = 2 * (size - 1)
        i = i.remainder(period)
        return torch.where(i > size - 1, period - i, i)

    def _window(self, y: int, x: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """None for a tile inside the image; else its row indices, its column indices relative to the first
        column it sees, and that column range."""
        if y >= 0 and x >= 0 and y + self.tile <= self.h and x + self.tile <= self.w:
            return None
        iy, ix = self._index(y, self.h, device), self._index(x, self.w, device)
        lo, hi = int(ix.min()), int(ix.max()) + 1
        return iy, ix - lo, lo, hi

    def gather(self, z: torch.Tensor, origins: list[tuple[int, int]], t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What :meth:`cut` gives from the padded image, taken from ``z`` itself: tiles inside the image are
        slices, the others are indexed through the reflection (no padded copy of the image). Differentiable."""
        tiles = []
        for y, x in origins:
            where = self._window(y, x, z.device)
            if where is None:
                tiles.append(z[:, :, y:y + self.tile, x:x + self.tile])
            else:
                iy, ix, lo, hi = where
                tiles.append(z[:, :, :, lo:hi].index_select(2, iy).index_select(3, ix))
        return torch.stack(tiles, 1).flatten(0, 1), t.repeat_interleave(len(origins))

    def scatter(self, acc: torch.Tensor, tiles: torch.Tensor, origins: list[tuple[int, int]]) -> None:
        """The adjoint of :meth:`gather`: add ``tiles`` ``(B, len(origins), C, tile, tile)`` into ``acc``
        ``(B, C, h, w)``, what fell on the reflection folded back onto the pixels it mirrors."""
        for k, (y, x) in enumerate(origins):
            where = self._window(y, x, acc.device)
            if where is None:
                acc[:, :, y:y + self.tile, x:x + self.tile] += tiles[:, k]
            else:
                iy, ix, lo, hi = where
                cols = torch.zeros(*acc.shape[:2], self.tile, hi - lo, dtype=acc.dtype, device=acc.device)
                cols.index_add_(3, ix, tiles[:, k])
                acc[:, :, :, lo:hi].index_add_(2, iy, cols)

    def weights(self, device: torch.device | str) -> torch.Tensor:
        """The sum of the window weights at every image pixel, ``(1, 1, h, w)`` (made once per tiling and device:
        each step's two network passes and both priors share it)."""
        return _weights(self, str(device))

    def add(self, acc: torch.Tensor, tiles: torch.Tensor, origins: list[tuple[int, int]]) -> None:
        """Add ``tiles`` ``(B, len(origins), C, tile, tile)`` (already weighted) into ``acc`` ``(B, C, h, w)`` at
        ``origins``, dropping what falls outside the image."""
        for k, (y, x) in enumerate(origins):
            y0, x0, y1, x1 = self.inside(y, x)
            acc[:, :, y0:y1, x0:x1] += tiles[:, k, :, y0 - y:y1 - y, x0 - x:x1 - x]

    def inside(self, y: int, x: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``: the part of the tile at ``(y, x)`` that lies on the image."""
        return max(y, 0), max(x, 0), min(y + self.tile, self.h), min(x + self.tile, self.w)


@functools.lru_cache(maxsize=4)
def _weights(tiling: Tiling, device: str) -> torch.Tensor:
    acc = torch.zeros(1, 1, tiling.h, tiling.w, device=device)
    k = len(tiling.origins)
    tiling.add(acc, window(tiling.tile, device).expand(1, k, 1, tiling.tile, tiling.tile), tiling.origins)
    return acc


def _chunks(origins: list[tuple[int, int]], images: int, batch: int) -> list[list[tuple[int, int]]]:
    """Origins in groups of at least one tile so that a group over ``images`` images holds at most ``batch``
    tiles (a single image larger than ``batch`` tiles is cut into several groups)."""
    per = max(1, batch // max(images, 1))
    return [origins[i:i + per] for i in range(0, len(origins), per)]


def blended(net: Net, z: torch.Tensor, t: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """The blended output of all tiles in one network call, differentiable with respect to ``z`` (for an image
    whose tiles fit in one tile batch: the vector-Jacobian product then needs no second forward pass)."""
    if tiling.single:
        return net(z, t)
    tiles, tt = tiling.gather(z, tiling.origins, t)
    e = net(tiles, tt) * window(tiling.tile, z.device)
    out = torch.zeros_like(z)
    tiling.add(out, e.reshape(z.shape[0], len(tiling.origins), *e.shape[1:]), tiling.origins)
    return out / tiling.weights(z.device)


def tiled(net: Net, z: torch.Tensor, t: torch.Tensor, tiling: Tiling, batch: int) -> torch.Tensor:
    """The network's output for the whole ``z`` ``(B, C, h, w)`` at times ``t`` ``(B,)``: tiles blended by their
    windows; at most about ``batch`` tiles per network call. No graph is kept."""
    if tiling.single:
        with torch.no_grad():
            return net(z, t)
    win = window(tiling.tile, z.device)
    out = torch.zeros_like(z)
    with torch.no_grad():
        for group in _chunks(tiling.origins, z.shape[0], batch):
            tiles, tt = tiling.gather(z, group, t)
            e = net(tiles, tt) * win
            tiling.add(out, e.reshape(z.shape[0], len(group), *e.shape[1:]), group)
    return out / tiling.weights(z.device)


def tiled_vjp(net: Net, z: torch.Tensor, t: torch.Tensor, tiling: Tiling, batch: int,
              cotangent: torch.Tensor) -> torch.Tensor:
    """``J^T cotangent`` for the blended output of :func:`tiled` with respect to ``z``, one tile group at a time:
    each group's gradient with respect to its tiles is added into the image's (:meth:`Tiling.scatter`, which folds
    what fell on the reflection back; no full-size graph per group).

    Memory: beside ``z`` and ``cotangent``, the result alone: tiles are taken from ``z`` and each tile's cotangent
    is cut from ``cotangent / weights``, tile by tile."""
    if tiling.single:
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            return torch.autograd.grad((net(zg, t) * cotangent).sum(), zg)[0]
    win = window(tiling.tile, z.device)
    weights = tiling.weights(z.device)
    out = torch.zeros_like(z)
    for group in _chunks(tiling.origins, z.shape[0], batch):
        tiles, tt = tiling.gather(z, group, t)
        ct = torch.stack([_cotangent_tile(cotangent, weights, tiling, y, x) for y, x in group], 1).flatten(0, 1)
        with torch.enable_grad():
            tg = tiles.detach().requires_grad_(True)
            g = torch.autograd.grad((net(tg, tt) * (ct * win)).sum(), tg)[0]
        tiling.scatter(out, g.reshape(z.shape[0], len(group), *g.shape[1:]), group)
        del tiles, ct, g
    return out


def _cotangent_tile(cotangent: torch.Tensor, weights: torch.Tensor, tiling: Tiling, y: int, x: int) -> torch.Tensor:
    """``cotangent / weights`` over the tile at ``(y, x)``, zero where the tile lies over the padding (what the
    network says there is dropped by the blend)."""
    y0, x0, y1, x1 = tiling.inside(y, x)
    part = cotangent[:, :, y0:y1, x0:x1] / weights[:, :, y0:y1, x0:x1]
    return F.pad(part, (x0 - x, x + tiling.tile - x1, y0 - y, y + tiling.tile - y1))
