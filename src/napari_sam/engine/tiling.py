"""Tiles: images larger than the model's input, encoded at full resolution piece by piece.

SAM squeezes any image into one (S, S) input (S = 1024): a 10000-pixel image would lose
10x resolution. A :class:`TileGrid` cuts the image into overlapping tiles of at most
``tile_shape`` pixels (S by default, so each tile is encoded at its own resolution):

* every tile has the same shape, ``min(tile_shape, image size)`` per axis, and lies wholly
  inside the image (tiles are spread evenly, so neighbours overlap by at least ``2 * halo``);
* every pixel belongs to exactly one tile's **interior** (the tiles' interiors partition
  the image; a border between two interiors lies in the middle of their overlap), so each
  interior pixel has at least ``halo`` pixels of context inside its tile, except at the
  image's own borders.

A prompt is decoded on the tile whose interior holds it (a box: the tile whose interior
holds most of it, see :meth:`TileGrid.tile_for_box`); the mask comes back in image
coordinates. Grid coordinates are (row, col) pixels of the whole image; SAM's prompts stay
(x, y).

numpy in, numpy out: no napari, no Qt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .image import robust_limits

# An image is tiled by default when its longest side exceeds this many model inputs: below,
# one squeezed encode loses at most 1.5x resolution and costs one encoder call, not 4.
AUTO_TILING_FACTOR = 1.5


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes:
        index: row-major position in the grid (``grid.tiles[index]``).
        outer_rc: (r0, r1, c0, c1) pixels of the image read and encoded (half-open).
        inner_rc: (r0, r1, c0, c1) the part of the image this tile owns (half-open).
    """

    index: int
    outer_rc: tuple[int, int, int, int]
    inner_rc: tuple[int, int, int, int]

    @property
    def offset_rc(self) -> tuple[int, int]:
        """(row, col) of the tile's first pixel in the image."""
        return self.outer_rc[0], self.outer_rc[2]

    @property
    def shape_hw(self) -> tuple[int, int]:
        r0, r1, c0, c1 = self.outer_rc
        return r1 - r0, c1 - c0

    @property
    def outer_slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices of the image read for this tile."""
        r0, r1, c0, c1 = self.outer_rc
        return slice(r0, r1), slice(c0, c1)

    @property
    def inner_in_tile(self) -> tuple[slice, slice]:
        """(rows, cols) slices of the interior in tile coordinates."""
        (r0, r1, c0, c1), (o_r, o_c) = self.inner_rc, self.offset_rc
        return slice(r0 - o_r, r1 - o_r), slice(c0 - o_c, c1 - o_c)


def _axis_tiles(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """[(outer0, outer1, inner0, inner1), …] along one axis of ``length`` pixels."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - 2 * halo
    n = math.ceil((length - tile) / step) + 1
    starts = [round(k * (length - tile) / (n - 1)) for k in range(n)]  # evenly spread
    # interior borders in the middle of each overlap: >= halo from both tiles' edges
    borders = [0] + [(starts[k + 1] + starts[k] + tile) // 2 for k in range(n - 1)] + [length]
    return [(s, s + tile, borders[k], borders[k + 1]) for k, s in enumerate(starts)]


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles covering an (H, W) image.

    Args:
        image_hw: (H, W) of the image.
        tile_shape: (h, w) largest tile (each tile is ``min(tile_shape, image_hw)``).
        halo: (rows, cols) of context kept around each tile's interior; ``2 * halo`` must
            be smaller than ``tile_shape`` on each axis.
    Raises:
        ValueError: non-positive sizes, or a halo that leaves no interior.
    """

    image_hw: tuple[int, int]
    tile_shape: tuple[int, int]
    halo: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("image_hw", "tile_shape", "halo"):
            value = getattr(self, name)
            try:
                pair = tuple(int(v) for v in value)
            except TypeError:
                pair = (int(value),) * 2
            if len(pair) != 2:
                raise ValueError(f"expected {name} as two integers (rows, cols), got {value!r}")
            object.__setattr__(self, name, pair)
        if min(self.image_hw) < 1 or min(self.tile_shape) < 1 or min(self.halo) < 0:
            raise ValueError(f"expected positive image and tile sizes and a halo >= 0, got "
                             f"image {self.image_hw}, tile_shape {self.tile_shape}, halo {self.halo}")
        if any(2 * h >= t for h, t in zip(self.halo, self.tile_shape)):
            raise ValueError(f"expected a halo smaller than half the tile (tile_shape "
                             f"{self.tile_shape}), got halo {self.halo}: tiles would own no pixels")

    # ------------------------------------------------------------------ layout
    @cached_property
    def _axes(self) -> tuple[list, list]:
        return tuple(_axis_tiles(n, t, h) for n, t, h in zip(self.image_hw, self.tile_shape, self.halo))

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return len(self._axes[0]), len(self._axes[1])

    @cached_property
    def tiles(self) -> tuple[Tile, ...]:
        """Every tile, row-major."""
        rows, cols = self._axes
        return tuple(
            Tile(i * len(cols) + j, (r[0], r[1], c[0], c[1]), (r[2], r[3], c[2], c[3]))
            for i, r in enumerate(rows) for j, c in enumerate(cols))

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def tile_hw(self) -> tuple[int, int]:
        """(h, w) of every tile."""
        return self.tiles[0].shape_hw

    def _owner(self, axis: int, position: float) -> int:
        bounds = [t[3] for t in self._axes[axis]][:-1]  # interior ends but the last
        pixel = min(max(math.floor(position), 0), self.image_hw[axis] - 1)
        return int(np.searchsorted(bounds, pixel, side="right"))

    def tile_at(self, row: float, col: float) -> Tile:
        """The tile whose interior holds pixel (row, col) (clamped to the image)."""
        return self.tiles[self._owner(0, row) * self.grid_shape[1] + self._owner(1, col)]

    def tile_for_points(self, points_xy: np.ndarray) -> Tile:
        """The tile whose interior holds most of the (N, 2) (x, y) points; ties: the tile of
        the first point (the first click names the object)."""
        points_xy = np.asarray(points_xy, dtype=float).reshape(-1, 2)
        if len(points_xy) == 0:
            raise ValueError("expected at least one point, got none")
        owners = [self.tile_at(y, x).index for x, y in points_xy]
        counts = np.bincount(owners, minlength=len(self))
        best = int(np.flatnonzero(counts == counts.max())[0])
        return self.tiles[owners[0]] if counts[owners[0]] == counts.max() else self.tiles[best]

    def tile_for_box(self, box_xyxy) -> Tile:
        """The tile whose interior holds the largest part of the box (x0, y0, x1, y1), ties
        broken by the largest part inside the tile itself; a box larger than a tile is
        decoded clipped to that tile."""
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box_xyxy, dtype=float).reshape(4))
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))

        def overlap(rc) -> float:
            r0, r1, c0, c1 = rc
            return max(0.0, min(y1, r1) - max(y0, r0)) * max(0.0, min(x1, c1) - max(x0, c0))

        if x1 - x0 <= 0 or y1 - y0 <= 0:  # a degenerate box: its corner decides
            return self.tile_at(y0, x0)
        scores = [(overlap(t.inner_rc), overlap(t.outer_rc)) for t in self.tiles]
        return self.tiles[max(range(len(scores)), key=lambda k: scores[k])]

    # ------------------------------------------------------------------ records
    def as_dict(self) -> dict:
        """{"tile_shape": [h, w], "halo": [h, w]}: what a store signature records."""
        return {"tile_shape": list(self.tile_shape), "halo": list(self.halo)}


def default_halo(tile_shape: Sequence[int]) -> tuple[int, int]:
    """An eighth of the tile per side (128 pixels for SAM's 1024): context for clicks near
    an interior's border, 78% of each 1024 tile owned."""
    return tuple(int(t) // 8 for t in tile_shape)


def tile_grid(image_hw: Sequence[int], image_size: int, tiling="auto", tile_shape=None,
              halo=None) -> TileGrid | None:
    """The tiling of an (H, W) image for a model of input size ``image_size``, or None.

    Args:
        tiling: "auto" (tile when the longest side exceeds ``AUTO_TILING_FACTOR`` model
            inputs), "on" / True (tile whenever the image is larger than one tile), or
            "off" / False / None (one squeezed encode, as SAM does).
        tile_shape: (h, w) or one int; default (image_size, image_size): full resolution.
        halo: (rows, cols) or one int; default :func:`default_halo`.
    Returns None when the image is not tiled (it fits one tile, or tiling is off).
    """
    if tiling in (False, None, "off"):
        return None
    if tiling not in (True, "on", "auto"):
        raise ValueError(f"expected tiling 'auto', 'on' or 'off', got {tiling!r}")
    h, w = (int(v) for v in image_hw[:2])
    tile = (image_size, image_size) if tile_shape is None else tile_shape
    tile = (int(tile), int(tile)) if np.ndim(tile) == 0 else tuple(int(t) for t in tile)
    halo = default_halo(tile) if halo is None else halo
    grid = TileGrid((h, w), tile, halo)
    if len(grid) == 1:
        return None
    if tiling == "auto" and max(h, w) <= AUTO_TILING_FACTOR * image_size:
        return None
    return grid


def read_tile(image, tile: Tile) -> np.ndarray:
    """The (h, w[, C]) pixels of ``tile`` from an (H, W[, C]) array-like (numpy, memmap, zarr,
    dask…): only that region is read."""
    rows, cols = tile.outer_slices
    return np.asarray(image[rows, cols])


def tiled_contrast_limits(image, grid: TileGrid, n_sample: int = 16,
                          max_pixels: int = 1 << 18) -> tuple[float, float] | None:
    """One (low, high) for every tile of a (possibly lazy) image: robust percentiles
    (:data:`~napari_sam.engine.image.ROBUST_PERCENTILES`) of up to ``n_sample`` evenly
    spaced tiles, each subsampled to about ``max_pixels``. Reads only those tiles. None for
    uint8 and bool images (passed through unchanged, see :mod:`napari_sam.engine.image`).
    Tiles normalised alike give comparable embeddings (and seamless stitching)."""
    dtype = np.dtype(image.dtype)
    if dtype in (np.uint8, np.bool_):
        return None
    picks = sorted({round(v) for v in np.linspace(0, len(grid) - 1, min(n_sample, len(grid)))})
    step = max(1, math.ceil(math.sqrt(grid.tile_hw[0] * grid.tile_hw[1] / max_pixels)))
    values = np.concatenate([read_tile(image, grid.tiles[k])[::step, ::step].astype(np.float32).ravel()
                             for k in picks])
    return robust_limits(values, "an image (sampled tiles)")


def image_hw_of(image) -> tuple[int, int]:
    """(H, W) of an (H, W) or (H, W, C) array-like (C in 1, 3, 4)."""
    shape = tuple(int(s) for s in getattr(image, "shape", np.shape(image)))
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4)):
        return shape[0], shape[1]
    raise ValueError(f"expected a 2D image (H, W) or (H, W, C) with C in 1, 3, 4, got shape {shape}")


__all__ = ["AUTO_TILING_FACTOR", "Tile", "TileGrid", "default_halo", "image_hw_of", "read_tile",
           "tile_grid", "tiled_contrast_limits"]
