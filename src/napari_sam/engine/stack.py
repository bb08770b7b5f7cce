"""A stack of 2D images read lazily, and embeddings of its slices computed on demand.

* :class:`StackView`: (N, H, W) or (N, H, W, 3|4) array-like along any stacking axis (or
  one (H, W) image, see :func:`single_image_stack`), read one (H, W) / (H, W, C) slice —
  or one region of a slice (:meth:`StackView.read`, e.g. a tile) — at a time;
* :func:`data_hash`: hash of its shape, dtype, axis and pixels (the data part of a
  store's signature);
* :func:`volume_contrast_limits`: ONE (low, high) for the whole stack, so that slices
  (and tiles) are normalised alike and their embeddings comparable;
* :class:`VolumeEmbeddings`: (1, C, He, We) embeddings encoded on demand, the last few
  kept in RAM; :class:`~napari_sam.engine.store.EmbeddingStore` keeps them on disk.

numpy in, numpy out: no napari, no Qt.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np

from .image import resized_shape, robust_limits
from .predictor import ImageEmbedding, SamPredictor
from .tiled_predictor import encode_tile
from .tiling import TileGrid

FULL_HASH_BYTES = 64 << 20


class _OneSlice:
    """A lazy (1, H, W[, C]) view of one (H, W[, C]) array-like (see :func:`single_image_stack`)."""

    def __init__(self, image) -> None:
        self.image = image
        self.shape = (1, *(int(s) for s in image.shape))
        self.dtype = np.dtype(image.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, slice):  # (1, …) kept
            return np.asarray(self.image[rest])[None][first]
        if int(first) not in (0, -1):
            raise IndexError(f"expected slice index 0 of a single image, got {first}")
        return np.asarray(self.image[rest])


def single_image_stack(image):
    """A one-slice stack (1, H, W[, C]) of an (H, W) or (H, W, 3|4) image, read lazily (only
    what is indexed is read from a zarr / dask / memmap image): a large 2D image is stored
    like a stack of one slice."""
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) != 2 and not (len(shape) == 3 and shape[-1] in (3, 4)):
        raise ValueError(f"expected a 2D image (H, W) or (H, W, 3|4), got shape {shape}")
    return _OneSlice(image)


class _Plane:
    """Slice ``index`` of a :class:`StackView` as a lazy (H, W[, C]) array-like: indexing
    it with (rows, cols) reads only that region (for :func:`~napari_sam.engine.tiling.read_tile`)."""

    def __init__(self, view: StackView, index: int) -> None:
        self.view, self.index = view, index
        colour = view.shape[3:]
        self.shape = (*view.slice_shape, *colour)
        self.dtype, self.ndim = view.dtype, len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = (tuple(key) + (slice(None), slice(None)))[:2]
        return self.view.read(self.index, rows, cols)


class StackView:
    """A stack of 2D images along ``axis``, read lazily one slice at a time.

    Args:
        volume: array-like with ``shape``, ``dtype`` and integer indexing (numpy, memmap,
            zarr, dask…): 3D grayscale, or 4D with a trailing colour axis (…, 3|4); a 2D
            (H, W) or (H, W, 3|4) image: pass :func:`single_image_stack` of it.
        axis: the stacking axis (z or t); not the colour axis.
    Slices are (H, W) or (H, W, C) numpy arrays of the volume's dtype.
    """

    def __init__(self, volume, axis: int = 0) -> None:
        shape = tuple(int(s) for s in getattr(volume, "shape", ()))
        ndim = len(shape)
        if ndim not in (3, 4) or (ndim == 4 and shape[-1] not in (3, 4)):
            raise ValueError(
                f"expected a 3D stack (N, H, W) or a colour stack (N, H, W, 3|4), got shape {shape}"
            )
        n_axes = 3  # stack axis + 2 image axes, colour excluded
        if not -n_axes <= axis < n_axes:
            raise ValueError(f"expected axis in [{-n_axes}, {n_axes - 1}], got {axis}")
        self.volume, self.axis, self.shape = volume, axis % n_axes, shape
        self.dtype = np.dtype(volume.dtype)
        self.slice_shape = tuple(s for k, s in enumerate(shape[:3]) if k != self.axis)
        if min(shape) == 0:
            raise ValueError(f"expected a non-empty stack, got shape {shape}")

    def __len__(self) -> int:
        return self.shape[self.axis]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"expected a slice index in [0, {len(self) - 1}], got {index}")
        key = [slice(None)] * len(self.shape)
        key[self.axis] = int(index)
        return np.asarray(self.volume[tuple(key)])

    def read(self, index: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """The (h, w[, C]) region ``rows`` x ``cols`` (slices of the (H, W) image, steps
        allowed) of slice ``index``: only that region is read from a lazy volume."""
        if not 0 <= index < len(self):
            raise IndexError(f"expected a slice index in [0, {len(self) - 1}], got {index}")
        key = [slice(None)] * len(self.shape)
        key[self.axis] = int(index)
        image_axes = [k for k in range(3) if k != self.axis]
        key[image_axes[0]], key[image_axes[1]] = rows, cols
        return np.asarray(self.volume[tuple(key)])

    def plane(self, index: int) -> _Plane:
        """Slice ``index`` as a lazy (H, W[, C]) array-like (regions read on indexing)."""
        if not 0 <= index < len(self):
            raise IndexError(f"expected a slice index in [0, {len(self) - 1}], got {index}")
        return _Plane(self, int(index))

    def sample_indices(self, n: int) -> list[int]:
        """Up to ``n`` evenly spaced slice indices, first and last included."""
        return sorted({round(v) for v in np.linspace(0, len(self) - 1, min(n, len(self)))})


def _samples(view: StackView, grid: TileGrid | None, n_sample: int, max_pixels: int):
    """Evenly spaced pieces of the stack, each read with a stride to about ``max_pixels``:
    ``n_sample`` slices (untiled), or ``n_sample`` (slice, tile) items of the N x T items
    (tiled: only those tiles are read, never a whole huge slice)."""
    if grid is None:
        step = max(1, math.ceil(math.sqrt(math.prod(view.slice_shape) / max_pixels)))
        every = slice(None, None, step) if step > 1 else slice(None)
        for i in view.sample_indices(n_sample):
            yield view.read(i, every, every)
        return
    n_items = len(view) * len(grid)
    # as tiling.tiled_contrast_limits picks tiles: the same ones for a single image
    picks = sorted({round(v) for v in np.linspace(0, n_items - 1, min(n_sample, n_items))})
    step = max(1, math.ceil(math.sqrt(grid.tile_hw[0] * grid.tile_hw[1] / max_pixels)))
    for item in picks:
        index, k = divmod(item, len(grid))
        rows, cols = grid.tiles[k].outer_slices
        yield view.read(index, slice(rows.start, rows.stop, step), slice(cols.start, cols.stop, step))


def data_hash(view: StackView, n_sample: int = 16, max_pixels: int = 1 << 20,
              grid: TileGrid | None = None) -> str:
    """Hash of shape, dtype, axis and pixels: every pixel up to 64 MiB of data; beyond,
    ``n_sample`` evenly spaced slices (or, with a ``grid``, tiles), each read with a stride
    to about ``max_pixels``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((view.shape, view.axis, view.dtype.str)).encode())
    if math.prod(view.shape) * view.dtype.itemsize <= FULL_HASH_BYTES:
        pieces = (view[i] for i in range(len(view)))
    else:
        pieces = _samples(view, grid, n_sample, max_pixels)
    for piece in pieces:
        h.update(np.ascontiguousarray(piece).tobytes())
    return h.hexdigest()


def volume_contrast_limits(view: StackView, n_sample: int = 16,
                           grid: TileGrid | None = None) -> tuple[float, float] | None:
    """One (low, high) for the whole stack: robust percentiles of sampled slices (with a
    ``grid``: sampled tiles, as :func:`~napari_sam.engine.tiling.tiled_contrast_limits`
    samples a single image), each read with a stride to about 2^18 pixels.

    ``None`` for uint8 and bool stacks (passed through unchanged, see ``engine.image``).
    """
    if view.dtype in (np.uint8, np.bool_):
        return None
    values = np.concatenate([piece.astype(np.float32).ravel()
                             for piece in _samples(view, grid, n_sample, 1 << 18)])
    return robust_limits(values, "a stack (sampled slices)")


def _as_predictor(model_or_predictor) -> SamPredictor:
    if isinstance(model_or_predictor, SamPredictor):
        return model_or_predictor
    if hasattr(model_or_predictor, "encode") and hasattr(model_or_predictor, "decode"):
        return SamPredictor(model_or_predictor)
    name = type(model_or_predictor).__name__
    raise ValueError(f"expected a SamPredictor or a SAM model, got {name}")


def _resolve_limits(view: StackView, contrast_limits, grid: TileGrid | None = None
                    ) -> tuple[float, float] | None:
    if isinstance(contrast_limits, str):
        if contrast_limits != "auto":
            raise ValueError(
                f"expected contrast_limits 'auto', None or (low, high), got {contrast_limits!r}")
        return volume_contrast_limits(view, grid=grid)
    if contrast_limits is None:
        return None
    lo, hi = (float(v) for v in contrast_limits)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(
            f"expected contrast_limits (low, high) with low <= high, got {contrast_limits}")
    return lo, hi


def _encode_slice(predictor: SamPredictor, image: np.ndarray, limits) -> ImageEmbedding:
    """Encode one slice with the stack-wide contrast limits (an all-NaN slice encodes as 0)."""
    if image.dtype.kind == "f" and not np.isfinite(image).any():
        image = np.zeros(image.shape, dtype=np.float32)
    return predictor.encode_image(image, contrast_limits=limits)


class _EmbeddingSource:
    """Shared part of the embedding sources: the stack, the predictor, the limits and the
    tiling (``grid``: a :class:`TileGrid` of each slice, or None).

    Embeddings are of *items*: item ``index * n_tiles + tile`` is tile ``tile`` of slice
    ``index`` (untiled: item == slice). ``original_size`` is (H, W) of a slice,
    ``item_size`` (h, w) of an item, ``input_size`` the item's resized size.
    """

    def __init__(self, view: StackView, predictor: SamPredictor, limits,
                 grid: TileGrid | None = None) -> None:
        if grid is not None and tuple(grid.image_hw) != tuple(view.slice_shape):
            raise ValueError(f"expected a tile grid of {tuple(view.slice_shape)} slices, got one "
                             f"of {tuple(grid.image_hw)}")
        self.view, self.predictor, self.contrast_limits, self.grid = view, predictor, limits, grid
        size = predictor.model.image_size
        self.original_size = tuple(view.slice_shape)
        self.item_size = self.original_size if grid is None else tuple(grid.tile_hw)
        self.input_size = resized_shape(*self.item_size, size)
        self.n_tiles = 1 if grid is None else len(grid)
        self.n_items = len(view) * self.n_tiles

    def __len__(self) -> int:
        return len(self.view)

    def encode(self, index: int) -> ImageEmbedding:
        """Encode slice ``index`` now, squeezed into one model input (no store involved)."""
        return _encode_slice(self.predictor, self.view[index], self.contrast_limits)

    def encode_item(self, item: int) -> ImageEmbedding:
        """Encode item ``item`` now: a whole slice, or one tile of a slice (only that
        region read, :func:`~napari_sam.engine.tiled_predictor.encode_tile`)."""
        if self.grid is None:
            return self.encode(item)
        index, k = divmod(int(item), self.n_tiles)
        return encode_tile(self.predictor, self.view.plane(index), self.grid.tiles[k],
                           self.contrast_limits)


class VolumeEmbeddings(_EmbeddingSource):
    """Embeddings of a stack computed on demand, the last ``cache_size`` kept in RAM.

    Same interface as :class:`~napari_sam.engine.store.EmbeddingStore` (``len``,
    ``embedding(i)``) without disk.
    """

    def __init__(self, volume, predictor, *, axis: int = 0, contrast_limits="auto",
                 cache_size: int = 4) -> None:
        view = StackView(volume, axis)
        super().__init__(view, _as_predictor(predictor), _resolve_limits(view, contrast_limits))
        self._cache: OrderedDict[int, ImageEmbedding] = OrderedDict()
        self._size = max(1, cache_size)

    def embedding(self, index: int) -> ImageEmbedding:
        """(1, C, He, We) embedding of slice ``index``."""
        if index not in self._cache:
            self._cache[index] = self.encode(index)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]
