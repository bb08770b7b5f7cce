"""Stitching per-tile instance label images into one label image of the whole image.

Segment-everything on a large image runs tile by tile (:mod:`.tiling`): every object near a
border between tiles is seen by two to four tiles, and an object larger than the halo is cut
by tile edges into pieces. :class:`TileStitcher` writes the tiles' label images into one
(H, W) output without duplicates or cut objects:

* **Which objects of a tile count**: those that intersect the tile's interior. An object
  lying wholly in a tile's halo lies in another tile's interior, which sees it with more
  context, so it is left to that tile (every object intersects some interior: the
  interiors partition the image).
* **Same object or not**: tiles are added in any order (grid order in practice). A new
  object is compared with the objects already written in the tile's *trusted window*: its
  outer rectangle less half a halo along each edge that is not the image's border (near
  those edges the tile lacks context: an object barely entering it may be taken for part
  of its neighbour). With ``I`` the pixels they share there and ``A``, ``B`` their areas
  there, they are one object when ``I / min(A, B) > min_overlap`` (default 0.5).
  Measuring inside the window makes a piece of a large object cut by a tile edge match its
  other pieces (the window holds only the part both tiles saw), while two touching
  distinct objects, which share at most a few boundary pixels, stay apart. (A kept object
  always has pixels in the window: the interior lies inside it.)
* **Merging**: a new object matching one or more existing objects takes their id (several
  existing ids are merged into one: union). Its pixels are painted only where the output
  is still 0, so nothing written is ever overwritten; a new object matching none gets a new
  id, unless fewer than ``max(1, min_size)`` of its pixels are free (then it is dropped, as
  :func:`~napari_sam.engine.label_image.masks_to_label_image` drops masks).
* **Ids**: new ids are issued in order of appearance (tile order, then the tile's own ids);
  merged objects keep the smallest of their ids. Merges are recorded in a union-find
  table, not repainted at once; :meth:`TileStitcher.finish` makes one pass over the output
  (region by region) that applies them and renumbers the ids consecutively, 1..K. Without
  any merge the ids are already 1..K and the output is not touched again.

Memory is bounded by a few tile-sized arrays and an id table: the output may be a numpy
array or any array-like with 2D slicing (a zarr array), read and written one tile region
at a time.

numpy in, numpy out: no napari, no Qt.
"""

from __future__ import annotations

import numpy as np

from .tiling import Tile, TileGrid

__all__ = ["TileStitcher", "stitch_tiles"]


class TileStitcher:
    """Writes per-tile label images into one label image (see the module docstring).

    Args:
        out: (H, W) integer array-like with ``shape`` and 2D slicing (numpy, zarr…), all 0
            (a fresh array), H, W = ``grid.image_hw``; uint32 recommended.
        grid: the tiling the label images come from.
        min_overlap: shared pixels / smaller area (inside a tile's region) above which two
            objects are one, in (0, 1].
        min_size: a new object with fewer free pixels is dropped (0: at least one pixel).
    """

    def __init__(self, out, grid: TileGrid, *, min_overlap: float = 0.5, min_size: int = 0) -> None:
        shape = tuple(int(s) for s in getattr(out, "shape", ()))
        if shape != tuple(grid.image_hw):
            raise ValueError(f"expected an output of shape {tuple(grid.image_hw)}, got {shape}")
        if not np.issubdtype(np.dtype(out.dtype), np.integer):
            raise ValueError(f"expected an integer output array, got dtype {out.dtype}")
        if not 0 < float(min_overlap) <= 1:
            raise ValueError(f"expected 0 < min_overlap <= 1, got {min_overlap}")
        if int(min_size) < 0:
            raise ValueError(f"expected min_size >= 0, got {min_size}")
        self.out, self.grid = out, grid
        self.min_overlap, self.min_size = float(min_overlap), int(min_size)
        self._parent = np.zeros(1024, dtype=np.int64)  # union-find: _parent[id]; 0 = background
        self._n = 0  # ids issued: 1.._n
        self._merged = False
        self._finished = False

    @property
    def n_ids(self) -> int:
        """Ids issued so far (before :meth:`finish`: merged ids counted separately)."""
        return self._n

    # ------------------------------------------------------------------ union-find
    def _roots(self) -> np.ndarray:
        """(n + 1,) root id of every id (path-compressed in place)."""
        parent = self._parent[: self._n + 1]
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                return parent
            parent[:] = up

    def _find(self, i: int) -> int:
        while self._parent[i] != i:
            i = int(self._parent[i])
        return i

    def _new_ids(self, count: int) -> np.ndarray:
        first = self._n + 1
        self._n += count
        if self._n >= len(self._parent):
            grown = np.zeros(max(2 * len(self._parent), self._n + 1), dtype=np.int64)
            grown[: len(self._parent)] = self._parent
            self._parent = grown
        ids = np.arange(first, self._n + 1, dtype=np.int64)
        self._parent[ids] = ids
        return ids

    # ------------------------------------------------------------------ stitching
    def add(self, tile: Tile, labels: np.ndarray) -> None:
        """Write one tile's objects.

        Args:
            tile: a tile of ``grid``.
            labels: (h, w) int label image of that tile (tile pixels, ``tile.shape_hw``;
                0 = background, any ids; each id one object).
        """
        if self._finished:
            raise RuntimeError("the stitcher is finished: create a new one for another image")
        labels = np.asarray(labels)
        if labels.shape != tuple(tile.shape_hw) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"expected (h, w) = {tuple(tile.shape_hw)} integer labels for tile "
                             f"{tile.index}, got shape {labels.shape} dtype {labels.dtype}")
        ids, new = np.unique(labels, return_inverse=True)  # new: (h, w) compact ids 0..m
        new = new.reshape(labels.shape)
        if ids[0] != 0:  # no background in this tile: compact ids start at 1
            new += 1
            ids = np.concatenate([[0], ids])
        m = len(ids) - 1
        if m == 0:
            return
        kept = np.zeros(m + 1, dtype=bool)
        kept[np.unique(new[tile.inner_in_tile])] = True  # objects touching the interior
        kept[0] = False
        new = np.where(kept[new], new, 0)  # (h, w) int64, 0..m

        rows, cols = tile.outer_slices
        region = np.asarray(self.out[rows, cols]).astype(np.int64)  # (h, w) written ids
        roots = self._roots()[region] if self._n else region  # (h, w) current ids
        window = self._window(tile)
        target = self._match(new[window], roots[window], m)  # (m + 1,) root per new object, 0: none

        free = region == 0
        free_count = np.bincount(new[free], minlength=m + 1)
        fresh = np.flatnonzero((target == 0) & kept & (free_count >= max(1, self.min_size)))
        target[fresh] = self._new_ids(len(fresh))
        paint = np.where(free, target[new], 0)  # (h, w): new pixels only
        if paint.any():
            region[paint > 0] = paint[paint > 0]
            self.out[rows, cols] = region.astype(self.out.dtype, copy=False)

    def _window(self, tile: Tile) -> tuple[slice, slice]:
        """(rows, cols) slices, in tile pixels, of the tile's trusted window."""
        (h, w), (image_h, image_w) = tile.shape_hw, self.grid.image_hw
        r0, r1, c0, c1 = tile.outer_rc
        mr, mc = (halo // 2 for halo in self.grid.halo)
        return (slice(mr if r0 > 0 else 0, h - (mr if r1 < image_h else 0)),
                slice(mc if c0 > 0 else 0, w - (mc if c1 < image_w else 0)))

    def _match(self, new: np.ndarray, roots: np.ndarray, m: int) -> np.ndarray:
        """(m + 1,) the root id each new object (1..m) is merged into (0: none), after
        merging the existing roots that one new object matches; ``new`` and ``roots`` are
        the window's new object ids and existing root ids."""
        target = np.zeros(m + 1, dtype=np.int64)
        both = (new > 0) & (roots > 0)
        if not both.any():
            return target
        stride = m + 1
        pairs, shared = np.unique(roots[both] * stride + new[both], return_counts=True)
        old_ids, new_ids = pairs // stride, pairs % stride
        new_area = np.bincount(new.ravel(), minlength=m + 1)
        old_list, old_area = np.unique(roots[roots > 0], return_counts=True)
        smaller = np.minimum(new_area[new_ids], old_area[np.searchsorted(old_list, old_ids)])
        same = shared / smaller > self.min_overlap
        for n, old in zip(new_ids[same].tolist(), old_ids[same].tolist()):
            old = self._find(old)
            if target[n] == 0:
                target[n] = old
                continue
            keep = self._find(int(target[n]))
            if keep != old:  # one new object joins two existing ones: union
                keep, drop = min(keep, old), max(keep, old)
                self._parent[drop] = keep
                self._merged = True
            target[n] = keep
        matched = np.flatnonzero(target)
        target[matched] = [self._find(int(t)) for t in target[matched]]
        return target

    def finish(self) -> int:
        """Apply the merges and renumber the ids 1..K (one pass over the output, region by
        region, only if some objects were merged). Returns K, the number of objects."""
        if self._finished:
            return self._count
        self._finished = True
        if not self._merged:
            self._count = self._n
            return self._count
        roots = self._roots()
        kept = np.unique(roots[1:])
        lut = np.zeros(self._n + 1, dtype=np.int64)
        lut[kept] = np.arange(1, len(kept) + 1)
        lut = lut[roots]  # id -> consecutive id of its root
        for tile in self.grid.tiles:  # the interiors partition the image
            r0, r1, c0, c1 = tile.inner_rc
            block = np.asarray(self.out[r0:r1, c0:c1])
            self.out[r0:r1, c0:c1] = lut[block].astype(self.out.dtype, copy=False)
        self._count = len(kept)
        return self._count


def stitch_tiles(grid: TileGrid, tile_labels, out=None, *, min_overlap: float = 0.5,
                 min_size: int = 0) -> tuple[np.ndarray, int]:
    """Stitch ``tile_labels`` (an iterable of (h, w) label images, one per ``grid.tiles``
    entry, in grid order) into ``out`` ((H, W) array-like of zeros; default a new uint32
    numpy array). Returns (out, number of objects); see :class:`TileStitcher`."""
    out = np.zeros(grid.image_hw, dtype=np.uint32) if out is None else out
    stitcher = TileStitcher(out, grid, min_overlap=min_overlap, min_size=min_size)
    count = 0
    for count, (tile, labels) in enumerate(zip(grid.tiles, tile_labels), start=1):
        stitcher.add(tile, labels)
    if count != len(grid):
        raise ValueError(f"expected {len(grid)} tile label images, got {count}")
    return out, stitcher.finish()
