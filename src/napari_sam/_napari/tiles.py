"""Tiled planes in the napari session: the tiling settings, per-tile cache keys, and
:class:`TileSource`, the embeddings of one tiled plane (cached, stored, or encoded on demand).

A plane larger than the model input (see :func:`napari_sam.engine.tiling.tile_grid`) is
encoded tile by tile at full resolution. Each tile is one :class:`ImageEmbedding` in the
session's :class:`~napari_sam.engine.EmbeddingCache`, keyed by layer (+ data version,
level), plane, tile shape, halo, tile index, model and normalisation — so a change of any
of them gives new keys (never a stale tile). Every tile of a plane is normalised alike:
the layer's contrast limits (SAM sees what the user sees), the store's when a store is
attached, or :func:`~napari_sam.engine.tiling.tiled_contrast_limits` of the plane.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from ..engine import EmbeddingKey, ImageEmbedding
from ..engine.tiled_predictor import encode_tile
from ..engine.tiling import TileGrid, tile_grid, tiled_contrast_limits
from .geometry import PlaneView, SlicePlane

TILINGS = ("auto", "on", "off")
MAX_CACHED_TILES = 64  # tiles kept in memory besides the slices (4 MiB each for SAM: 256 MiB)


@dataclass(frozen=True)
class TilingSettings:
    """How planes are tiled.

    Attributes:
        mode: "auto" (tile planes whose longest side exceeds 1.5 model inputs), "on"
            (tile every plane larger than a tile) or "off" (one squeezed encode).
        tile_shape: (h, w) pixels of a tile; None: the model's input size.
        halo: (rows, cols) of context around each tile's interior; None: an eighth of
            the tile.
    """

    mode: str = "auto"
    tile_shape: tuple[int, int] | None = None
    halo: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in TILINGS:
            raise ValueError(f"expected tiling in {TILINGS}, got {self.mode!r}")
        for name in ("tile_shape", "halo"):
            value = getattr(self, name)
            if value is not None:
                pair = (int(value),) * 2 if isinstance(value, (int, float)) else tuple(int(v) for v in value)
                if len(pair) != 2:
                    raise ValueError(f"expected {name} as one or two integers, got {value!r}")
                object.__setattr__(self, name, pair)
        if self.tile_shape is not None:
            self.check(self.tile_shape[0])

    def check(self, image_size: int) -> None:
        """ValueError unless the halo leaves each tile an interior (for a model of input
        ``image_size`` when the tile size is the model's)."""
        tile = self.tile_shape or (int(image_size), int(image_size))
        TileGrid(tile, tile, self.halo or 0)

    def grid(self, shape_hw, image_size: int) -> TileGrid | None:
        """The tiling of an (H, W) plane for a model of input ``image_size``, or None."""
        return tile_grid(shape_hw, image_size, self.mode, self.tile_shape, self.halo)

    def describe(self, image_size: int) -> str:
        h, w = self.tile_shape or (image_size, image_size)
        return f"{h} px" if h == w else f"{h} x {w} px"


def tile_key(plane_key: EmbeddingKey, grid: TileGrid, k: int) -> EmbeddingKey:
    """The cache key of tile ``k`` of the plane whose (untiled) key is ``plane_key``."""
    return dataclasses.replace(plane_key, index=(*plane_key.index, "tile", grid.tile_shape, grid.halo, int(k)))


class TileSource:
    """The tiles of one plane of an image (layer or level): ``embedding(k)`` from the
    session's cache, the attached store, or encoded now (blocking; any thread).

    Build it on the GUI thread (:meth:`SamSession.tile_source`): it captures the data
    array, the keys, the normalisation and the store; later calls touch no layer.

    Attributes:
        grid: the plane's :class:`TileGrid`; plane: the :class:`SlicePlane`;
        image: the plane as a lazy (H, W[, C]) :class:`PlaneView` (tiles read one by one);
        keys: one :class:`EmbeddingKey` per tile.
    """

    def __init__(self, session, source, plane: SlicePlane, grid: TileGrid, data, plane_key: EmbeddingKey,
                 store=None) -> None:
        self.session, self.source, self.plane, self.grid = session, source, plane, grid
        self.image = PlaneView(data, plane)
        self.plane_key = plane_key
        self.keys = tuple(tile_key(plane_key, grid, k) for k in range(len(grid)))
        self.store = store
        self._limits = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.grid)

    def same_as(self, other) -> bool:
        return other is not None and other.keys == self.keys

    def cached(self, k: int) -> ImageEmbedding | None:
        return self.session.cache.get(self.keys[k])

    def n_cached(self) -> int:
        return sum(key in self.session.cache for key in self.keys)

    @property
    def contrast_limits(self) -> tuple[float, float] | None:
        """The one (low, high) of every tile (None: uint8 pass-through). Sampled from the
        plane's tiles only when neither the layer nor a store gives it (read once)."""
        norm = self.plane_key.normalisation
        if norm[0] == "contrast":
            return tuple(norm[1:])
        if norm[0] == "uint8":
            return None
        with self._lock:  # ("store",): the store's per-slice percentiles, made plane-wide
            if self._limits is None:
                self._limits = (tiled_contrast_limits(self.image, self.grid),)
            return self._limits[0]

    def embedding(self, k: int, cancel: threading.Event | None = None) -> ImageEmbedding:
        """Tile ``k``'s embedding: cached, stored, or encoded now (reading that tile only).
        ``cancel`` stops an encode within a block (``Stopped`` is raised)."""
        cached = self.session.cache.get(self.keys[k])
        if cached is not None:
            return cached
        predictor = self.session.predictor_for(self.plane_key)
        tile = self.grid.tiles[k]
        stored = self.session.stored_tile(self.store, self.plane, self.grid, self.plane_key)
        if stored is not None:
            embedding = stored[0].tile_embedding(stored[1], tile)
        else:
            embedding = encode_tile(predictor, self.image, tile, self.contrast_limits, cancel)
        if predictor is self.session._predictor:  # the model did not change meanwhile
            self.session.cache.put(self.keys[k], embedding)
        return embedding


def describe_plane(session, source, plane: SlicePlane | None, tiles: TileSource | None = None) -> str:
    """How ``plane`` of ``source`` is encoded, for the status line: e.g. "tiled: 7 x 4
    tiles of 1024 px (3/28 encoded)" or "not tiled: …". ``tiles``: its TileSource if
    the caller has one (else the count comes from the cache keys)."""
    if plane is None or not session.has_model:
        return "tiling: no image or model yet"
    level = getattr(source, "level", None)
    at = "" if level is None else f" at level {level}"
    size = session.model.image_size
    grid = session.grid_for(source, plane)
    if grid is None:
        h, w = plane.shape_hw
        return f"not tiled: the {h} x {w} px plane{at} is encoded as one {size} px input"
    if tiles is None or tiles.grid != grid:
        key = session.key_for(source, plane)
        done = sum(tile_key(key, grid, k) in session.cache for k in range(len(grid)))
    else:
        done = tiles.n_cached()
    rows, cols = grid.grid_shape
    return f"tiled: {rows} x {cols} tiles of {session.tiling.describe(size)}{at} ({done}/{len(grid)} encoded)"


__all__ = ["MAX_CACHED_TILES", "TILINGS", "TileSource", "TilingSettings", "describe_plane", "tile_key"]
