"""Tiles of a network input larger than the model's test size.

Neighbouring tiles overlap by at least ``overlap`` pixels; each tile's *core* is the part of it
nearer to its own centre than to any neighbour's, halfway across each overlap, so the cores
partition the image. An object is kept from the one tile whose core holds its keypoint, and is
whole in that tile when it reaches no further than ``overlap / 2`` past the core.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["Placement", "Tile", "tile_grid"]


class Placement(NamedTuple):
    """Where a network input lies in the image it is a tile of, in network-input pixels."""

    origin: tuple[int, int]  # (y, x) of the input's top-left pixel in the image
    image_hw: tuple[int, int]  # (height, width) of the image


class Tile(NamedTuple):
    """One tile: its pixels ``[y0, y1) x [x0, x1)`` and its core ``[core_y0, core_y1) x [core_x0,
    core_x1)``, in pixels of the whole image."""

    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int

    def placement(self, image_hw: tuple[int, int]) -> Placement:
        return Placement((self.y0, self.x0), image_hw)

    def holds(self, points):
        """Which (x, y) points ((N, 2) tensor or array, continuous pixel coordinates) lie in the
        core: (N,) bool."""
        x, y = points[:, 0], points[:, 1]
        return (x >= self.core_x0) & (x < self.core_x1) & (y >= self.core_y0) & (y < self.core_y1)


def _axis_tiles(length: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, end, core_start, core_end) of the tiles along one axis of ``length`` pixels:
    as few tiles of ``size`` as overlap by ``overlap`` at least, spread evenly."""
    if length <= size:
        return [(0, length, 0, length)]
    count = math.ceil((length - overlap) / (size - overlap))
    # floor(i * span / (count - 1)): neighbours lie at most ceil(span / (count - 1)) <= size -
    # overlap apart
    starts = [i * (length - size) // (count - 1) for i in range(count)]
    ends = [start + size for start in starts]
    # core boundaries halfway across each overlap
    cuts = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(count - 1)] + [length]
    return [(starts[i], ends[i], cuts[i], cuts[i + 1]) for i in range(count)]


def tile_grid(height: int, width: int, size: int, overlap: int) -> list[Tile]:
    """Tiles of at most ``size`` x ``size`` covering a ``height`` x ``width`` image, row by row;
    one tile (the image) when it fits.

    Raises:
        ValueError: if ``overlap`` is not in ``[0, size)``.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"tile overlap must be in [0, tile size {size}), got {overlap}")
    return [
        Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
        for y0, y1, cy0, cy1 in _axis_tiles(height, size, overlap)
        for x0, x1, cx0, cx1 in _axis_tiles(width, size, overlap)
    ]
