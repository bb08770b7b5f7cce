"""Prompts on images larger than the model's input: encode tiles, decode on the right one.

* :func:`encode_tiles_job` encodes every tile of a :class:`~napari_sam.engine.tiling.TileGrid`
  (reading only that tile of a lazy array), as a long job with progress and cancel;
* :class:`TiledEmbedding` holds the grid and one :class:`ImageEmbedding` per tile;
* :class:`TiledPredictor` decodes a point or box prompt on the tile whose interior holds it
  and returns masks in image coordinates (``predict``, as ``SamPredictor.predict``) or as a
  tile-sized crop with its offset (``predict_tile``, for large images).

numpy in, numpy out: no napari, no Qt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np

from .automatic import Progress, run_to_end
from .predictor import (
    ImageEmbedding,
    SamPredictor,
    Stopped,
    _model_signature,
    sort_box_corners,
)
from .tiling import (
    Tile,
    TileGrid,
    image_hw_of,
    read_tile,
    tile_grid,
    tiled_contrast_limits,
)


@dataclass(frozen=True)
class TiledEmbedding:
    """The embeddings of every tile of an image.

    Attributes:
        grid: the tiling of the (H, W) image.
        tiles: one :class:`ImageEmbedding` per ``grid.tiles`` entry (row-major), each of a
            (h, w) tile: ``original_size == grid.tile_hw``.
        contrast_limits: the (low, high) every tile was normalised with (None: uint8
            pass-through).
    """

    grid: TileGrid
    tiles: tuple[ImageEmbedding, ...]
    contrast_limits: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.tiles) != len(self.grid):
            raise ValueError(f"expected one embedding per tile ({len(self.grid)}), got {len(self.tiles)}")

    @property
    def original_size(self) -> tuple[int, int]:
        """(H, W) of the whole image."""
        return self.grid.image_hw

    @property
    def model_signature(self) -> str:
        return self.tiles[0].model_signature


def encode_tile(predictor: SamPredictor, image, tile: Tile,
                contrast_limits: tuple[float, float] | None, cancel=None) -> ImageEmbedding:
    """Encode one ``tile`` of an (H, W[, C]) array-like (reads that region only). An
    all-NaN tile encodes as zeros (as an all-NaN stack slice does). ``cancel`` (an Event)
    stops the encoder within a block: :class:`~napari_sam.engine.predictor.Stopped`."""
    pixels = read_tile(image, tile)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
        pixels = np.zeros(pixels.shape, dtype=np.float32)
    return predictor.encode_image(pixels, contrast_limits=contrast_limits, cancel=cancel)


def resolve_tile_limits(image, grid: TileGrid, contrast_limits) -> tuple[float, float] | None:
    """``contrast_limits`` of a tiled image: "auto" -> :func:`tiled_contrast_limits` (one
    pair for all tiles), None or (low, high) as given."""
    if isinstance(contrast_limits, str):
        if contrast_limits != "auto":
            raise ValueError(f"expected contrast_limits 'auto', None or (low, high), got {contrast_limits!r}")
        return tiled_contrast_limits(image, grid)
    if contrast_limits is None:
        return None
    low, high = (float(v) for v in contrast_limits)
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise ValueError(f"expected contrast_limits (low, high) with low <= high, got {contrast_limits}")
    return low, high


def encode_tiles_job(predictor: SamPredictor, image, grid: TileGrid, contrast_limits="auto", *,
                     cancel: threading.Event | None = None,
                     embedding_for: Callable[[int], ImageEmbedding | None] | None = None,
                     ) -> Generator[Progress, None, TiledEmbedding | None]:
    """Encode every tile of ``image`` ((H, W) or (H, W, C) array-like, read one tile at a
    time). Yields :class:`Progress` after each tile; returns the :class:`TiledEmbedding`,
    or None when ``cancel`` was set (acts within an encoder block, well under a second).

    ``embedding_for(k)`` may return tile k's stored embedding (then it is not encoded).
    """
    if image_hw_of(image) != grid.image_hw:
        raise ValueError(f"expected an image of {grid.image_hw} pixels for this grid, got {image_hw_of(image)}")
    limits = resolve_tile_limits(image, grid, contrast_limits)
    embeddings = []
    for tile in grid.tiles:
        if cancel is not None and cancel.is_set():
            return None
        embedding = embedding_for(tile.index) if embedding_for is not None else None
        if embedding is None:
            try:
                embedding = encode_tile(predictor, image, tile, limits, cancel)
            except Stopped:
                return None
        embeddings.append(embedding)
        yield Progress(tile.index + 1, len(grid), f"tile {tile.index + 1}/{len(grid)}")
    return TiledEmbedding(grid, tuple(embeddings), limits)


@dataclass
class TilePrediction:
    """Masks of one prompt decoded on one tile.

    Attributes:
        tile: where (``tile.offset_rc`` places the masks in the image).
        masks: (C, h, w) bool (or float32 logits) in tile pixels.
        iou: (C,) float32 predicted IoU; low_res: (C, 4He, 4We) float32 logits of the tile.
    """

    tile: Tile
    masks: np.ndarray
    iou: np.ndarray
    low_res: np.ndarray

    def full(self, image_hw: Sequence[int]) -> np.ndarray:
        """(C, H, W) masks in image pixels (zero / False outside the tile)."""
        out = np.zeros((len(self.masks), *image_hw[:2]), dtype=self.masks.dtype)
        rows, cols = self.tile.outer_slices
        out[:, rows, cols] = self.masks
        return out


class TiledPredictor:
    """Point and box prompts on a tiled image; masks in image coordinates.

    Args:
        sam_model: a :class:`~napari_sam.model.Sam` (or compatible), or a
            :class:`SamPredictor` to decode with.
    Attributes: ``predictor`` (the per-tile :class:`SamPredictor`), ``grid``,
    ``contrast_limits``, ``original_size`` (H, W), ``is_image_set``.
    """

    def __init__(self, sam_model) -> None:
        self.predictor = sam_model if isinstance(sam_model, SamPredictor) else SamPredictor(sam_model)
        self.model = self.predictor.model
        self.reset_image()

    def reset_image(self) -> None:
        self.grid: TileGrid | None = None
        self.contrast_limits = None
        self._embedding_for: Callable[[int], ImageEmbedding] | None = None
        self._current: int | None = None
        self.is_image_set = False

    @property
    def original_size(self) -> tuple[int, int] | None:
        return None if self.grid is None else self.grid.image_hw

    def set_image(self, image, tiling="on", tile_shape=None, halo=None, contrast_limits="auto",
                  cancel: threading.Event | None = None) -> None:
        """Encode every tile of ``image`` ((H, W[, C]) array-like; blocking). ``tiling``,
        ``tile_shape``, ``halo``: as :func:`~napari_sam.engine.tiling.tile_grid`; an image
        that fits one tile is one tile."""
        hw = image_hw_of(image)
        grid = tile_grid(hw, self.model.image_size, tiling, tile_shape, halo)
        if grid is None:
            size = self.model.image_size if tile_shape is None else tile_shape
            grid = TileGrid(hw, size, 0)
        embedding = run_to_end(encode_tiles_job(self.predictor, image, grid, contrast_limits, cancel=cancel))
        if embedding is not None:
            self.set_tiled_embedding(embedding)

    def set_tiled_embedding(self, embedding: TiledEmbedding) -> None:
        """Decode against ``embedding`` (checked to be of this model)."""
        expected = _model_signature(self.model)
        if embedding.model_signature != expected:
            raise ValueError(f"expected tiles encoded by {expected}, got {embedding.model_signature}")
        tiles = embedding.tiles
        self.set_tiles(embedding.grid, lambda k: tiles[k], embedding.contrast_limits)

    def set_tiles(self, grid: TileGrid, embedding_for: Callable[[int], ImageEmbedding],
                  contrast_limits=None) -> None:
        """Decode against tiles fetched on demand: ``embedding_for(k)`` returns tile k's
        embedding (from a cache or a store; called once per change of tile)."""
        self.grid, self._embedding_for, self.contrast_limits = grid, embedding_for, contrast_limits
        self._current = None
        self.is_image_set = True

    def use_tile(self, tile: Tile) -> SamPredictor:
        """Make ``tile``'s embedding current in :attr:`predictor` (kept while clicks stay on
        the same tile) and return the predictor."""
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image() or set_tiled_embedding() first")
        if self._current != tile.index:
            embedding = self._embedding_for(tile.index)
            if tuple(embedding.original_size) != tile.shape_hw:
                raise ValueError(f"expected tile {tile.index} of {tile.shape_hw} pixels, got an "
                                 f"embedding of {tuple(embedding.original_size)}")
            self.predictor.set_embedding(embedding)
            self._current = tile.index
        return self.predictor

    def choose_tile(self, points_xy: np.ndarray | None, box_xyxy: np.ndarray | None) -> Tile:
        """The tile a prompt is decoded on: a box's (:meth:`TileGrid.tile_for_box`), else the
        points' (:meth:`TileGrid.tile_for_points`, foreground points counted)."""
        if self.grid is None:
            raise RuntimeError("no image is set: call set_image() or set_tiled_embedding() first")
        if box_xyxy is not None:
            return self.grid.tile_for_box(box_xyxy)
        if points_xy is None or len(points_xy) == 0:
            raise ValueError("expected a point or a box prompt on a tiled image, got neither")
        return self.grid.tile_for_points(points_xy)

    def predict_tile(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                     multimask_output: bool = True, return_logits: bool = False) -> TilePrediction:
        """Decode one object on the tile that holds its prompt.

        Args:
            point_coords: (N, 2) float (x, y) pixels of the whole image; point_labels (N,)
                int 1 / 0 (-1 ignored). Points outside the chosen tile are left out (they
                could not be seen by its embedding).
            box: (4,) x0 y0 x1 y1 pixels of the whole image (clipped to the chosen tile).
            mask_input: (1, 4He, 4We) low-res logits of the same tile (``low_res`` of a
                previous :class:`TilePrediction`).
        Returns: a :class:`TilePrediction` (masks in tile pixels, with the tile).
        """
        points = labels = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("expected point_coords and point_labels together, got only one")
            points = np.asarray(point_coords, dtype=float).reshape(-1, 2)
            labels = np.asarray(point_labels).reshape(-1)
            if labels.shape != (len(points),):
                raise ValueError(f"expected point_labels ({len(points)},), got {labels.shape}")
        box_xyxy = None if box is None else sort_box_corners(np.asarray(box, dtype=float).reshape(4))
        counted = None if points is None else points[labels == 1] if (labels == 1).any() else points
        tile = self.choose_tile(counted, box_xyxy)
        r0, r1, c0, c1 = tile.outer_rc
        if points is not None:
            inside = (points[:, 0] >= c0) & (points[:, 0] < c1) & (points[:, 1] >= r0) & (points[:, 1] < r1)
            points, labels = points[inside] - (c0, r0), labels[inside]
            if len(points) == 0:
                points = labels = None
        if box_xyxy is not None:
            box_xyxy = np.clip(box_xyxy - (c0, r0, c0, r0), 0, (c1 - c0, r1 - r0) * 2)
        predictor = self.use_tile(tile)
        masks, iou, low_res = predictor.predict(points, labels, box_xyxy, mask_input,
                                                multimask_output, return_logits)
        return TilePrediction(tile, masks, iou, low_res)

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output: bool = True, return_logits: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``SamPredictor.predict``: masks (C, H, W) of the whole image, iou (C,),
        low-res logits (C, 4He, 4We) of the tile used (see :meth:`predict_tile`, which
        avoids whole-image masks on large images)."""
        result = self.predict_tile(point_coords, point_labels, box, mask_input, multimask_output,
                                   return_logits)
        return result.full(self.grid.image_hw), result.iou, result.low_res
