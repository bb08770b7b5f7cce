"""A stack of 2D images read lazily, and embeddings of its slices computed on demand.

* :class:`StackView`: (N, H, W) or (N, H, W, 3|4) array-like along any stacking axis,
  read one (H, W) / (H, W, C) slice at a time;
* :func:`data_hash`: hash of its shape, dtype, axis and pixels (the data part of a
  store's signature);
* :func:`volume_contrast_limits`: ONE (low, high) for the whole stack, so that slices
  are normalised alike and their embeddings comparable;
* :class:`VolumeEmbeddings`: (1, C, He, We) embeddings encoded on demand, the last few
  kept in RAM; :class:`~napari_sam.engine.store.EmbeddingStore` keeps them on disk.

numpy in, numpy out: no napari, no Qt.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np

from .image import ROBUST_PERCENTILES, resized_shape
from .predictor import ImageEmbedding, SamPredictor

FULL_HASH_BYTES = 64 << 20


class StackView:
    """A stack of 2D images along ``axis``, read lazily one slice at a time.

    Args:
        volume: array-like with ``shape``, ``dtype`` and integer indexing (numpy, memmap,
            zarr, dask…): 3D grayscale, or 4D with a trailing colour axis (…, 3|4).
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

    def sample_indices(self, n: int) -> list[int]:
        """Up to ``n`` evenly spaced slice indices, first and last included."""
        return sorted({int(round(v)) for v in np.linspace(0, len(self) - 1, min(n, len(self)))})


def data_hash(view: StackView, n_sample: int = 16, max_pixels: int = 1 << 20) -> str:
    """Hash of shape, dtype, axis and pixels: every pixel up to 64 MiB of data; beyond,
    ``n_sample`` evenly spaced slices, each subsampled to about ``max_pixels``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((view.shape, view.axis, view.dtype.str)).encode())
    if math.prod(view.shape) * view.dtype.itemsize <= FULL_HASH_BYTES:
        indices, step = range(len(view)), 1
    else:
        indices = view.sample_indices(n_sample)
        step = max(1, math.ceil(math.sqrt(math.prod(view.slice_shape) / max_pixels)))
    for i in indices:
        h.update(np.ascontiguousarray(view[i][::step, ::step]).tobytes())
    return h.hexdigest()


def volume_contrast_limits(view: StackView, n_sample: int = 16) -> tuple[float, float] | None:
    """One (low, high) for the whole stack: robust percentiles of sampled slices.

    ``None`` for uint8 and bool stacks (passed through unchanged, see ``engine.image``).
    """
    if view.dtype in (np.uint8, np.bool_):
        return None
    step = max(1, math.ceil(math.sqrt(math.prod(view.slice_shape) / (1 << 18))))
    values = np.concatenate(
        [view[i][::step, ::step].astype(np.float32).ravel() for i in view.sample_indices(n_sample)]
    )
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("expected a stack with finite values, got only NaN/inf in sampled slices")
    lo, hi = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def _as_predictor(model_or_predictor) -> SamPredictor:
    if isinstance(model_or_predictor, SamPredictor):
        return model_or_predictor
    if hasattr(model_or_predictor, "encode") and hasattr(model_or_predictor, "decode"):
        return SamPredictor(model_or_predictor)
    name = type(model_or_predictor).__name__
    raise ValueError(f"expected a SamPredictor or a SAM model, got {name}")


def _resolve_limits(view: StackView, contrast_limits) -> tuple[float, float] | None:
    if isinstance(contrast_limits, str):
        if contrast_limits != "auto":
            raise ValueError(
                f"expected contrast_limits 'auto', None or (low, high), got {contrast_limits!r}")
        return volume_contrast_limits(view)
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
    """Shared part of the embedding sources: the stack, the predictor, the limits."""

    def __init__(self, view: StackView, predictor: SamPredictor, limits) -> None:
        self.view, self.predictor, self.contrast_limits = view, predictor, limits
        size = predictor.model.image_size
        self.original_size = tuple(view.slice_shape)
        self.input_size = resized_shape(*self.original_size, size)

    def __len__(self) -> int:
        return len(self.view)

    def encode(self, index: int) -> ImageEmbedding:
        """Encode slice ``index`` now (no store involved)."""
        return _encode_slice(self.predictor, self.view[index], self.contrast_limits)


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
