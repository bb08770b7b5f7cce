"""A persistent embedding store: a stack is encoded once, ever.

Layout (a zarr group in zarr *format 2*, so that zarr>=2.16 and zarr 3 both read it)::

    STACK.zarr/
      .napari-sam-store   marker: this folder was made by us (so we may rebuild it)
      .zattrs             {"napari_sam_store": signature}
      features            (N, C, He, We) float16 (or float32), one chunk per slice, raw
      done                (N,) int64, one chunk per slice: -1 = missing, else the crc32
                          of that slice's stored bytes

Signature: data hash (shape, dtype, axis and the pixels — all of them up to 64 MiB, else
evenly spaced sampled slices), model signature (type + checkpoint sha256), model input size,
normalisation (ONE set of contrast limits for the whole stack, so slices are comparable),
package version, slice and resized sizes, storage dtype. A different signature means
recompute, with a message (:class:`StoreStatus`) — or :class:`StoreMismatchError` if asked.

Write protocol, robust to crashes, full disks and partial writes: ``done[i] = -1`` (if it
was set), then ``features[i]``, then ``done[i] = crc``. A slice counts only when its flag
is set *and* its bytes match the crc, checked on every read: a truncated, missing or
corrupt chunk is marked missing and recomputed, never returned and never a crash. Broken
metadata rebuilds the whole store (only a folder carrying our marker is ever deleted).

RAM stays bounded whatever the stack length: slices are read, encoded and written one at
a time; only the (N,) flags are held. One writer per store at a time (threads of one
process are fine; two processes writing the same store are not supported).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image import ROBUST_PERCENTILES
from .predictor import ImageEmbedding, _model_signature
from .stack import (FULL_HASH_BYTES, StackView, VolumeEmbeddings,  # noqa: F401 - re-exported
                    _as_predictor, _EmbeddingSource, _resolve_limits, data_hash,
                    volume_contrast_limits)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = ".napari-sam-store"
ATTRS_KEY = "napari_sam_store"


class StoreError(RuntimeError):
    """Base class of store errors."""


class StoreWriteError(StoreError):
    """Writing failed (disk full, permissions…); slices already stored stay valid."""


class StoreMismatchError(StoreError):
    """The store was made for other data/model/normalisation and ``on_mismatch="error"``."""


@dataclass(frozen=True)
class StoreStatus:
    """What :meth:`EmbeddingStore.open` found.

    state: "created" (new store), "reused" (same signature), "recomputed" (different
    signature: cleared), "rebuilt" (corrupt or unreadable: cleared).
    """

    state: str
    message: str
    changed: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrecomputeProgress:
    """Yielded after each slice is stored: ``index`` just became ready."""

    index: int
    n_ready: int
    n_slices: int
    n_computed: int


@dataclass(frozen=True)
class PrecomputeResult:
    n_computed: int
    n_ready: int
    n_slices: int
    cancelled: bool
    seconds: float


class EmbeddingStore(_EmbeddingSource):
    """Embeddings of a stack on disk. Open with :meth:`open`; see the module docstring."""

    @classmethod
    def open(cls, path, volume, predictor, *, axis: int = 0, contrast_limits="auto",
             dtype: str = "float16", on_mismatch: str = "recompute") -> EmbeddingStore:
        """Open (or create, or rebuild) the store at ``path`` for ``volume`` and a model.

        Args:
            path: folder of the store (``.zarr``); created if missing.
            volume: the stack, see :class:`StackView` (read lazily).
            predictor: :class:`SamPredictor` or model used to encode missing slices.
            axis: stacking axis of ``volume``.
            contrast_limits: "auto" (robust percentiles of the whole stack), None (uint8
                pass-through / per-slice robust percentiles), or (low, high).
            dtype: "float16" or "float32" storage of a new store (an existing one keeps its own).
            on_mismatch: "recompute" (clear and say so in ``status``) or "error".
        Raises:
            ValueError: bad arguments, or ``path`` is a file / a foreign non-empty folder.
            StoreMismatchError: signature differs and ``on_mismatch="error"``.
            StoreWriteError: the store could not be created.
        """
        if dtype not in ("float16", "float32"):
            raise ValueError(f"expected dtype 'float16' or 'float32', got {dtype!r}")
        if on_mismatch not in ("recompute", "error"):
            raise ValueError(f"expected on_mismatch 'recompute' or 'error', got {on_mismatch!r}")
        view = StackView(volume, axis)
        self = cls(view, _as_predictor(predictor), _resolve_limits(view, contrast_limits))
        self.path, self.dtype, self._lock = Path(path), np.dtype(dtype), threading.Lock()
        self.signature = self._make_signature()
        self.status = self._open_or_create(on_mismatch)
        if self.status.state != "created":
            (log.info if self.status.state == "reused" else log.warning)(self.status.message)
        return self

    def _make_signature(self) -> dict:
        from .. import __version__

        return {
            "format": FORMAT_VERSION,
            "data": {"hash": data_hash(self.view), "shape": list(self.view.shape),
                     "dtype": self.view.dtype.str, "axis": self.view.axis},
            "model": _model_signature(self.predictor.model),
            "image_size": int(self.predictor.model.image_size),
            "normalisation": {
                "contrast_limits": None if self.contrast_limits is None else list(self.contrast_limits),
                "percentiles": list(ROBUST_PERCENTILES),
            },
            "package_version": __version__,
            "original_size": list(self.original_size),
            "input_size": list(self.input_size),
            "storage_dtype": self.dtype.name,
        }

    # ------------------------------------------------------------ open / create
    def _open_or_create(self, on_mismatch: str) -> StoreStatus:
        path = self.path
        if path.exists() and not path.is_dir():
            raise ValueError(f"expected a folder for the store, got the file {path}")
        ours = (path / MARKER).is_file()
        if path.is_dir() and not ours and any(path.iterdir()):
            raise ValueError(f"expected a napari-sam store or an empty folder at {path}, got a "
                             "folder with other content: refusing to overwrite it")
        if not ours:
            self._create()
            return StoreStatus("created", f"created embedding store {path}")
        try:
            stored = self._load()
        except Exception as exc:  # noqa: BLE001 - any damage means rebuild, never crash
            self._wipe_and_create()
            return StoreStatus("rebuilt", f"store {path} was unreadable ({type(exc).__name__}: "
                               f"{exc}); rebuilt it, every slice will be recomputed")
        stored_dtype = stored.get("storage_dtype") if isinstance(stored, dict) else None
        if stored_dtype in ("float16", "float32"):  # the dtype argument is for new stores
            self.dtype, self.signature["storage_dtype"] = np.dtype(stored_dtype), stored_dtype
        if stored == self.signature:
            n = int(self.ready.sum())
            return StoreStatus("reused", f"reusing store {path}: {n}/{len(self)} slices ready")
        changed = tuple(k for k in self.signature if stored.get(k) != self.signature.get(k))
        message = (f"store {path} was made for a different {', '.join(changed)}: "
                   "its embeddings do not match this stack/model")
        if on_mismatch == "error":
            raise StoreMismatchError(message)
        self._wipe_and_create()
        message += "; cleared it, slices will be recomputed"
        return StoreStatus("recomputed", message, changed)

    def _wipe_and_create(self) -> None:
        try:
            if (self.path / MARKER).is_file():
                shutil.rmtree(self.path)
        except OSError as exc:
            raise StoreWriteError(f"could not clear the store {self.path}: {exc}") from exc
        self._create()

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER).write_text("napari-sam embedding store\n")
            group = _open_group(self.path)
            group.attrs[ATTRS_KEY] = self.signature
            self._group, self._features = group, None
            self._done_arr = _create_array(group, "done", (len(self),), (1,), "int64", -1)
        except OSError as exc:
            raise StoreWriteError(f"could not create the store {self.path}: {exc}") from exc
        self._done = np.full(len(self), -1, dtype=np.int64)

    def _load(self) -> dict:
        group = _open_group(self.path)
        stored = dict(group.attrs)[ATTRS_KEY]
        done = group["done"]
        if done.shape != (len(self),):
            raise ValueError(f"expected done flags of shape ({len(self)},), got {done.shape}")
        features = group["features"] if "features" in group else None
        if features is not None and (features.shape[0] != len(self) or features.ndim != 4):
            raise ValueError(
                f"expected features of shape ({len(self)}, C, He, We), got {features.shape}")
        self._group, self._done_arr, self._features = group, done, features
        self._done = _read_flags(done)
        if features is None:  # flags without data (a deleted folder): nothing is ready
            self._done[:] = -1
        return stored

    # ------------------------------------------------------------ slices
    @property
    def ready(self) -> np.ndarray:
        """(N,) bool: slices stored (not yet re-verified; reads verify)."""
        return self._done >= 0

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise ValueError(f"expected a slice index in [0, {len(self) - 1}], got {index}")
        return int(index)

    def get(self, index: int) -> ImageEmbedding | None:
        """The stored embedding of slice ``index`` ((1, C, He, We) float32), or None when
        missing or damaged (a damaged slice is marked missing, to be recomputed)."""
        index = self._check_index(index)
        crc = int(self._done[index])
        if crc < 0 or self._features is None:
            return None
        try:
            data = np.asarray(self._features[index])
            ok = data.dtype == self.dtype and zlib.crc32(data.tobytes()) == crc
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt chunk: recompute it
            log.debug("slice %d unreadable: %s", index, exc)
            ok = False
        if not ok:
            log.warning("store %s: slice %d is damaged; it will be recomputed", self.path, index)
            self._set_flag(index, -1)
            return None
        return self._embedding_of(data)

    def put(self, index: int, embedding: ImageEmbedding) -> ImageEmbedding:
        """Store ``embedding`` as slice ``index``; returns it at storage precision.

        Raises:
            ValueError: the embedding is for another model or image size, or overflows.
            StoreWriteError: the write failed (disk full…); the slice stays missing.
        """
        index = self._check_index(index)
        if (embedding.model_signature != self.signature["model"]
                or tuple(embedding.original_size) != self.original_size
                or tuple(embedding.input_size) != self.input_size):
            raise ValueError(f"expected an embedding of a {self.original_size} slice by "
                             f"{self.signature['model']}, got {embedding.original_size} by "
                             f"{embedding.model_signature}")
        data = embedding.features[0].detach().cpu().float().numpy().astype(self.dtype)
        if not np.isfinite(data).all():
            raise ValueError(f"expected features finite in {self.dtype.name}, got overflow: "
                             "use dtype='float32'")
        with self._lock:
            try:
                if self._features is None:
                    self._features = _create_array(self._group, "features",
                                                   (len(self), *data.shape), (1, *data.shape),
                                                   self.dtype.name, 0)
                if self._done[index] >= 0:
                    self._set_flag(index, -1, raise_errors=True)
                self._features[index] = data  # 1) the data ...
                self._set_flag(index, zlib.crc32(data.tobytes()), raise_errors=True)  # 2) the flag
            except OSError as exc:
                raise StoreWriteError(
                    f"could not write slice {index} to {self.path} ({exc.strerror or exc}); "
                    f"{int(self.ready.sum())}/{len(self)} slices are stored and valid — free "
                    "some space and run again to resume") from exc
        return self._embedding_of(data)

    def _embedding_of(self, data: np.ndarray) -> ImageEmbedding:
        """(C, He, We) stored array -> (1, C, He, We) float32 :class:`ImageEmbedding`."""
        features = torch.from_numpy(data.astype(np.float32))[None]
        return ImageEmbedding(features, self.original_size, self.input_size, self.signature["model"])

    def _set_flag(self, index: int, value: int, raise_errors: bool = False) -> None:
        try:
            self._done_arr[index] = value
        except OSError:
            if raise_errors:
                raise
        self._done[index] = value

    def embedding(self, index: int) -> ImageEmbedding:
        """Slice ``index``'s embedding: from disk, or encoded now and stored. A failed
        write is logged and the embedding still returned (interactive use goes on)."""
        stored = self.get(index)
        if stored is not None:
            return stored
        fresh = self.encode(index)
        try:
            return self.put(index, fresh)
        except StoreWriteError as exc:
            log.warning("%s", exc)
            return fresh

    # ------------------------------------------------------------ long work
    def precompute(self, center: int | Callable[[], int] = 0, *, cancel=None
                   ) -> Generator[PrecomputeProgress, None, PrecomputeResult]:
        """Encode and store every missing slice, nearest to ``center`` first (outward:
        c, c+1, c-1, c+2, …). ``center`` may be a callable (e.g. the slice on screen), asked
        before each slice. Stop by closing the generator or setting ``cancel``
        (``threading.Event``): every slice yielded so far is committed, nothing half.

        Raises:
            StoreWriteError: a write failed; slices stored before it stay valid.
        """
        start, computed, cancelled = time.perf_counter(), 0, False
        while True:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            index = self._next_missing(center() if callable(center) else center)
            if index is None:
                break
            self.put(index, self.encode(index))
            computed += 1
            yield PrecomputeProgress(index, int(self.ready.sum()), len(self), computed)
        return PrecomputeResult(computed, int(self.ready.sum()), len(self), cancelled,
                                time.perf_counter() - start)

    def verify(self) -> Generator[int, None, int]:
        """Re-read every ready slice and check its crc (yields indices); returns how many
        were damaged (now marked missing, so :meth:`precompute` recomputes them)."""
        damaged = 0
        for index in np.flatnonzero(self.ready):
            damaged += self.get(int(index)) is None
            yield int(index)
        return damaged

    def _next_missing(self, center: int) -> int | None:
        missing = np.flatnonzero(self._done < 0)
        if missing.size == 0:
            return None
        center = min(max(int(center), 0), len(self) - 1)
        # nearest first; on ties the slice after the centre before the one before it
        order = np.lexsort((missing < center, np.abs(missing - center)))
        return int(missing[order[0]])


def outward_order(n: int, center: int) -> list[int]:
    """[c, c+1, c-1, c+2, c-2, …] clipped to [0, n): the order :meth:`precompute` follows."""
    center = min(max(int(center), 0), n - 1)
    order = [center]
    for d in range(1, n):
        order += [i for i in (center + d, center - d) if 0 <= i < n]
    return order


def read_store_info(path) -> dict | None:
    """The signature of the store at ``path`` plus ``n_ready``, or None if there is no
    readable store there (for a widget to describe a store before opening it)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return None
    try:
        group = _open_group(path, mode="r")
        info = dict(dict(group.attrs)[ATTRS_KEY])
        info["n_ready"] = int((_read_flags(group["done"]) >= 0).sum())
        return info
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- zarr 2 / 3 compatibility
def _zarr_v3() -> bool:
    import zarr

    return int(zarr.__version__.split(".")[0]) >= 3


def _open_group(path: Path, mode: str = "a"):
    import zarr

    if _zarr_v3():
        return zarr.open_group(str(path), mode=mode, zarr_format=2)
    return zarr.open_group(str(path), mode=mode)


def _create_array(group, name, shape, chunks, dtype, fill_value):
    if _zarr_v3():
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                  fill_value=fill_value, compressors=None, overwrite=True)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype,
                                fill_value=fill_value, compressor=None, overwrite=True)


def _read_flags(done) -> np.ndarray:
    """(N,) int64 flags; a damaged flag chunk reads as missing (-1)."""
    try:
        return np.asarray(done[:], dtype=np.int64)
    except Exception:  # noqa: BLE001 - one bad chunk: read them one by one
        flags = np.full(done.shape[0], -1, dtype=np.int64)
        for i in range(done.shape[0]):
            try:
                flags[i] = int(done[i])
            except Exception:  # noqa: BLE001
                pass
        return flags
