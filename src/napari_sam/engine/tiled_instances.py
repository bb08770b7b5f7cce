"""Segment-everything tile by tile on images larger than the model's input.

:func:`tiled_labels_job` runs one mode (AMG, AIS or APG, through a per-image labels job of
:class:`~napari_sam.engine.instances.SamInstanceSegmenter`) on every tile of a
:class:`~napari_sam.engine.tiling.TileGrid` in grid order, and stitches the tiles' label
images into one (H, W) label image with :class:`~napari_sam.engine.stitching.TileStitcher`
(no duplicates, no cut objects). Per tile:

1. its embedding: ``embedding_for(k)`` (cached or stored: no encoder call), else encoded
   from that tile's pixels with ONE normalisation for all tiles
   (:func:`~napari_sam.engine.tiled_predictor.resolve_tile_limits`, computed only if a
   tile needs encoding or AMG needs pixels);
2. the mode on the tile (AMG needs the tile's pixels, read alone from a lazy image; AIS /
   APG only the embedding);
3. stitching; the tile's pixels, embedding and labels are dropped before the next tile.

numpy in, numpy out: no napari, no Qt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator

import numpy as np

from .automatic import Progress
from .predictor import ImageEmbedding, Stopped
from .stitching import TileStitcher
from .tiled_predictor import encode_tile, resolve_tile_limits
from .tiling import TileGrid, image_hw_of, read_tile

__all__ = ["nested_job", "tiled_labels_job"]

# labels_job(pixels | None, embedding, contrast_limits, cancel) -> job of (h, w) labels | None
LabelsJob = Callable[..., Generator[Progress, None, "tuple[np.ndarray, object] | None"]]


def nested_job(job: Generator[Progress, None, object], cancel: threading.Event | None,
               index: int, count: int, what: str) -> Generator[Progress, None, object]:
    """Run ``job`` as part ``index`` of ``count`` (a slice, a tile): its progress rescaled
    to the whole and prefixed ``"{what} {index + 1}/{count}: "``. Returns its value, or
    None as soon as ``cancel`` is set after a step (the job is closed)."""
    try:
        while True:
            try:
                step = next(job)
            except StopIteration as stop:
                return stop.value
            total = max(step.total, 1)
            yield Progress(index * total + step.done, count * total,
                           f"{what} {index + 1}/{count}: {step.message}")
            if cancel is not None and cancel.is_set():
                return None
    finally:
        job.close()


def tiled_labels_job(labels_job: LabelsJob, predictor, image, grid: TileGrid, *, mode: str,
                     contrast_limits="auto",
                     embedding_for: Callable[[int], ImageEmbedding | None] | None = None,
                     out=None, min_overlap: float = 0.5, min_size: int = 0,
                     cancel: threading.Event | None = None,
                     ) -> Generator[Progress, None, tuple[object, int] | None]:
    """Segment every tile of an image and stitch the objects.

    Args:
        labels_job: ``labels_job(pixels, embedding, contrast_limits, cancel)``, the
            per-image job of one mode; its value is ``(labels, …)`` with (h, w) int labels
            in tile pixels, or None when cancelled.
        predictor: the :class:`~napari_sam.engine.predictor.SamPredictor` tiles are
            encoded with.
        image: (H, W[, C]) array-like (numpy, memmap, zarr, dask; read one tile at a time),
            or None when every tile's embedding comes from ``embedding_for`` and the mode
            needs no pixels (ais / apg).
        grid: the tiling (``grid.image_hw`` == (H, W) of the image).
        mode: "amg" reads the pixels of every tile; "ais" / "apg" only of tiles to encode.
        contrast_limits: "auto" or None (one (low, high) for all tiles from sampled tiles),
            or (low, high).
        embedding_for: ``embedding_for(k)`` -> tile k's embedding (of ``tile.shape_hw``
            pixels), or None to encode it.
        out: (H, W) integer array-like of zeros the labels are written into (numpy, zarr);
            default a new (H, W) uint32 numpy array.
        min_overlap, min_size: see :class:`~napari_sam.engine.stitching.TileStitcher`.
        cancel: checked between tiles and inside each tile's work.
    Returns:
        the job; its value is ``(out, K)`` with objects 1..K in ``out`` (0 = background),
        or None when cancelled (``out`` then holds the tiles done so far).
    """
    if image is not None and image_hw_of(image) != tuple(grid.image_hw):
        raise ValueError(f"expected an image of {tuple(grid.image_hw)} pixels for this grid, "
                         f"got {image_hw_of(image)}")
    out = np.zeros(grid.image_hw, dtype=np.uint32) if out is None else out
    stitcher = TileStitcher(out, grid, min_overlap=min_overlap, min_size=min_size)
    limits: list = []  # resolved on first need: [(low, high) | None]

    def tile_limits():
        if not limits:
            given = "auto" if contrast_limits is None else contrast_limits
            limits.append(resolve_tile_limits(image, grid, given) if image is not None or given != "auto"
                          else None)
        return limits[0]

    n = len(grid)
    for tile in grid.tiles:
        if cancel is not None and cancel.is_set():
            return None
        embedding = embedding_for(tile.index) if embedding_for is not None else None
        if embedding is not None and tuple(embedding.original_size) != tuple(tile.shape_hw):
            raise ValueError(f"expected tile {tile.index}'s embedding of {tuple(tile.shape_hw)} pixels, "
                             f"got one of {tuple(embedding.original_size)}")
        if embedding is None and image is None:
            raise ValueError(f"expected the image's pixels or tile {tile.index}'s embedding, got neither")
        if embedding is None:
            yield Progress(tile.index, n, f"tile {tile.index + 1}/{n}: encoding")
            try:
                embedding = encode_tile(predictor, image, tile, tile_limits(), cancel)
            except Stopped:  # cancelled inside the encoder
                return None
            if cancel is not None and cancel.is_set():
                return None
        pixels = None
        if mode == "amg":
            pixels = read_tile(image, tile)
            if pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
                pixels = None  # an all-NaN tile holds no objects
        labels = None
        if pixels is not None or mode != "amg":
            job = labels_job(pixels, embedding, tile_limits() if mode == "amg" else None, cancel)
            result = yield from nested_job(job, cancel, tile.index, n, "tile")
            if result is None:
                return None
            labels = result[0]
            stitcher.add(tile, labels)
        del embedding, pixels, labels  # nothing of this tile is kept
    yield Progress(n, n, "stitching")
    return out, stitcher.finish()
