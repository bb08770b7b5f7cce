"""A persistent embedding store: a stack is encoded once, ever.

Layout (a zarr group in zarr *format 2*, so that zarr>=2.16 and zarr 3 both read it)::

    STACK.zarr/
      .napari-sam-store   marker: this folder was made by us
      .zgroup, .zattrs    {"napari_sam_store": signature}
      features/           (N, C, He, We) float16 (or float32), one chunk per slice, raw
      done/               (N,) int64, one chunk per slice: -1 = missing, else the crc32
                          of that slice's stored bytes

Signature (what a store *is*): store format (:data:`FORMAT_VERSION`), data hash (shape,
dtype, axis and the pixels — all of them up to 64 MiB, else evenly spaced sampled slices),
model signature (type + checkpoint sha256), model input size, normalisation (ONE set of
contrast limits for the whole stack, so slices are comparable), slice and resized sizes,
storage dtype. ``package_version`` is recorded for information only: upgrading napari-sam
never invalidates a store; a change of layout bumps :data:`FORMAT_VERSION` instead.

Nothing is ever deleted silently. A store made for something else is, by
``on_mismatch``:

* ``"error"`` (default): refused with :class:`StoreMismatchError` saying what differs;
* ``"recompute"``: cleared — only what the store wrote itself (``features``, ``done``, the
  group metadata and the marker; never the folder, never a file of the user's) — and
  recomputed;
* ``"read_only"``: used as it is, never written; stored slices are served even if they were
  made from other pixels or another normalisation (the status says so), missing slices are
  encoded in memory only. A store of another model or image size is unusable: refused.

A store that cannot be opened (unreadable metadata, flags of the wrong shape…) is refused
with :class:`StoreReadError` naming the path and the cause, and left exactly as it is.

Write protocol, robust to crashes, full disks and partial writes: ``done[i] = -1`` (if it
was set), then ``features[i]``, then ``done[i] = crc``. A slice counts only when its flag
is set *and* its bytes match the crc, checked on every read: a truncated, missing or
corrupt chunk is marked missing and recomputed, never returned and never a crash.

RAM stays bounded whatever the stack length: slices are read, encoded and written one at
a time; only the (N,) flags are held. Reads and writes take one lock (a worker
precomputing and the GUI thread reading may share a store); two processes writing the same
store are not supported.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from collections import OrderedDict
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
ON_MISMATCH = ("error", "recompute", "read_only")
# recorded in the signature for information, never compared
INFO_KEYS = ("package_version",)
# differences that make stored features unusable for this model/stack, even read-only
UNUSABLE_KEYS = ("format", "model", "image_size", "original_size", "input_size", "storage_dtype")
MEMORY_CACHE = 4  # read-only stores: slices encoded in memory, the last few kept


class StoreError(RuntimeError):
    """Base class of store errors (also: a read-only store asked to write)."""


class StoreWriteError(StoreError):
    """Writing failed (disk full, permissions…); slices already stored stay valid."""


class StoreReadError(StoreError):
    """An existing store could not be opened (unreadable metadata…); it was left as it is."""


class StoreMismatchError(StoreError):
    """The store was made for other data/model/normalisation (see ``on_mismatch``).

    Attributes: ``path``, ``changed`` (signature keys that differ, e.g. ("data",)),
    ``details`` (what differs, in words, e.g. "normalisation (contrast limits [0, 255] in
    the store, [0, 100] now)") and ``usable_read_only`` (False for another model or image
    size: its features cannot serve this model at all).
    """

    def __init__(self, message: str, path: Path | None = None, changed: tuple[str, ...] = (),
                 details: str = "", usable_read_only: bool = False) -> None:
        super().__init__(message)
        self.path, self.changed, self.details = path, changed, details
        self.usable_read_only = usable_read_only


@dataclass(frozen=True)
class StoreStatus:
    """What :meth:`EmbeddingStore.open` found.

    state: "created" (new store), "reused" (same signature), "recomputed" (different
    signature, ``on_mismatch="recompute"``: cleared), "read_only" (different signature,
    ``on_mismatch="read_only"``: used as it is, never written). ``changed``: the signature
    keys that differ ("data", "model", "normalisation", …); ``message``: one line for a
    user.
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
    """Embeddings of a stack on disk. Open with :meth:`open`; see the module docstring.

    Attributes: ``path``, ``status`` (:class:`StoreStatus`), ``read_only`` (bool),
    ``contrast_limits`` ((low, high) or None: the normalisation used for this stack — the
    store's own with ``contrast_limits="stored"``), ``signature`` (dict), ``ready``.
    """

    @classmethod
    def open(cls, path, volume, predictor, *, axis: int = 0, contrast_limits="auto",
             dtype: str = "float16", on_mismatch: str = "error") -> EmbeddingStore:
        """Open (or create) the store at ``path`` for ``volume`` and a model.

        Args:
            path: folder of the store (``.zarr``); created if missing.
            volume: the stack, see :class:`StackView` (read lazily).
            predictor: :class:`SamPredictor` or model used to encode missing slices.
            axis: stacking axis of ``volume``.
            contrast_limits: "auto" (robust percentiles of the whole stack), "stored" (the
                normalisation recorded in the store at ``path`` if there is a readable one,
                else "auto"), None (uint8 pass-through / per-slice robust percentiles), or
                (low, high).
            dtype: "float16" or "float32" storage of a new store (an existing one keeps its own).
            on_mismatch: what to do with a store made for something else: "error" (raise
                :class:`StoreMismatchError`), "recompute" (clear what the store wrote and
                recompute) or "read_only" (use it as it is, never write it).
        Raises:
            ValueError: bad arguments, or ``path`` is a file / a foreign non-empty folder.
            StoreMismatchError: signature differs and ``on_mismatch="error"``, or the store
                is of another model / image size and ``on_mismatch="read_only"``.
            StoreReadError: the existing store cannot be read (left as it is).
            StoreWriteError: the store could not be created or cleared.
        """
        if dtype not in ("float16", "float32"):
            raise ValueError(f"expected dtype 'float16' or 'float32', got {dtype!r}")
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"expected on_mismatch in {ON_MISMATCH}, got {on_mismatch!r}")
        path = Path(path)
        if isinstance(contrast_limits, str) and contrast_limits == "stored":
            contrast_limits = stored_contrast_limits(path, default="auto")
        view = StackView(volume, axis)
        self = cls(view, _as_predictor(predictor), _resolve_limits(view, contrast_limits))
        self.path, self.dtype, self._lock = path, np.dtype(dtype), threading.RLock()
        self.read_only = False
        self._memory: OrderedDict[int, ImageEmbedding] = OrderedDict()
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
            "package_version": __version__,  # information only, see INFO_KEYS
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
        stored = self._read_signature()
        requested_dtype = self.dtype
        stored_dtype = stored.get("storage_dtype")
        if stored_dtype in ("float16", "float32"):  # the dtype argument is for new stores
            self.dtype, self.signature["storage_dtype"] = np.dtype(stored_dtype), stored_dtype
        changed = _differences(stored, self.signature)
        if not changed:
            self._load(mode="a")
            n = int(self.ready.sum())
            return StoreStatus("reused", f"reusing store {path}: {n}/{len(self)} slices ready")
        details = _describe(changed, stored, self.signature)
        n_stored = _stored_slice_count(stored)
        usable = not any(k in UNUSABLE_KEYS for k in changed) and n_stored == len(self)
        if on_mismatch == "error":
            raise StoreMismatchError(
                f"store {path} was made for a different {details}; its embeddings do not match "
                "this stack/model. Open it with on_mismatch='recompute' to clear and recompute "
                "it" + (", with on_mismatch='read_only' to use its slices as they are" if usable
                        else "") + ", or choose another store path",
                path, changed, details, usable)
        if on_mismatch == "recompute":
            self.dtype, self.signature["storage_dtype"] = requested_dtype, requested_dtype.name
            self._clear()
            self._create()
            return StoreStatus("recomputed", f"store {path} was made for a different {details}; "
                               "cleared it, slices will be recomputed", changed)
        if not usable:
            why = (f"it holds {n_stored} slices, this stack {len(self)}"
                   if n_stored != len(self) and not any(k in UNUSABLE_KEYS for k in changed)
                   else "its features do not fit this model/image size")
            raise StoreMismatchError(
                f"store {path} cannot be used, even read-only: it was made for a different "
                f"{details} ({why}). Open it with on_mismatch='recompute' to clear and "
                "recompute it, or choose another store path", path, changed, details, False)
        self.read_only = True
        self._load(mode="r")
        n = int(self.ready.sum())
        return StoreStatus("read_only", f"store {path} is open read-only, made for a different "
                           f"{details}: its {n}/{len(self)} stored slices are used as they are, "
                           "missing slices are encoded but not stored", changed)

    def _read_signature(self) -> dict:
        try:
            group = _open_group(self.path, mode="r")
            stored = dict(group.attrs)[ATTRS_KEY]
            if not isinstance(stored, dict):
                raise ValueError(f"expected a signature dict, got {type(stored).__name__}")
            return stored
        except Exception as exc:  # noqa: BLE001 - any damage: refuse, never touch it
            raise self._unreadable(exc) from exc

    def _unreadable(self, exc: BaseException) -> StoreReadError:
        cause = (str(exc).splitlines() or [""])[0]
        return StoreReadError(
            f"cannot open the embedding store {self.path}: {type(exc).__name__}: {cause}. "
            "It was left as it is: move or delete that folder to start a new store, or "
            "choose another store path")

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

    def _clear(self) -> None:
        """Remove what the store wrote itself, nothing else (never the folder)."""
        try:
            for name in ("features", "done"):
                _remove_array(self.path / name)
            for name in (".zattrs", ".zgroup", MARKER):
                (self.path / name).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"could not clear the store {self.path}: {exc}") from exc

    def _load(self, mode: str) -> None:
        try:
            group = _open_group(self.path, mode=mode)
            done = group["done"]
            if done.shape != (len(self),):
                raise ValueError(f"expected done flags of shape ({len(self)},), got {done.shape}")
            features = group["features"] if "features" in group else None
            if features is not None and (features.shape[0] != len(self) or features.ndim != 4):
                raise ValueError(
                    f"expected features of shape ({len(self)}, C, He, We), got {features.shape}")
            flags = _read_flags(done)
        except Exception as exc:  # noqa: BLE001 - any damage: refuse, never touch it
            raise self._unreadable(exc) from exc
        self._group, self._done_arr, self._features = group, done, features
        self._done = flags
        if features is None:  # flags without data (a deleted folder): nothing is ready
            self._done[:] = -1

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
        with self._lock:
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
            StoreError: the store is read-only.
        """
        index = self._check_index(index)
        if self.read_only:
            raise StoreError(f"store {self.path} is read-only: slice {index} cannot be stored")
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
        if not self.read_only:  # a read-only store only forgets in memory
            try:
                self._done_arr[index] = value
            except OSError:
                if raise_errors:
                    raise
        self._done[index] = value

    def embedding(self, index: int) -> ImageEmbedding:
        """Slice ``index``'s embedding: from disk, or encoded now and stored (read-only:
        kept in memory, the last few). A failed write is logged and the embedding still
        returned (interactive use goes on)."""
        stored = self.get(index)
        if stored is not None:
            return stored
        if self.read_only:
            with self._lock:
                if index in self._memory:
                    self._memory.move_to_end(index)
                    return self._memory[index]
            fresh = self.encode(index)
            with self._lock:
                self._memory[index] = fresh
                while len(self._memory) > MEMORY_CACHE:
                    self._memory.popitem(last=False)
            return fresh
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
            StoreError: at once, if the store is read-only.
            StoreWriteError: a write failed; slices stored before it stay valid.
        """
        if self.read_only:
            raise StoreError(f"store {self.path} is read-only ({self.status.message}): nothing "
                             "can be precomputed into it; open it with on_mismatch='recompute' "
                             "to recompute it, or choose another store path")
        return self._precompute(center, cancel)

    def _precompute(self, center, cancel) -> Generator[PrecomputeProgress, None, PrecomputeResult]:
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
    """What the store at ``path`` was made for, or None if there is no readable store there
    (for a widget to describe a store before opening it). Never writes.

    Returns the stored signature plus ``n_ready``: ``info["format"]``, ``info["data"]``
    (``hash``, ``shape``, ``dtype``, ``axis``), ``info["model"]`` (type:checkpoint sha256),
    ``info["image_size"]``, ``info["normalisation"]["contrast_limits"]`` ([low, high] or
    None — the normalisation to show the layer with), ``info["original_size"]``,
    ``info["input_size"]``, ``info["storage_dtype"]``, ``info["package_version"]`` (the
    version that made it; information only) and ``info["n_ready"]``.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        return None
    try:
        group = _open_group(path, mode="r")
        info = dict(dict(group.attrs)[ATTRS_KEY])
        has_features = "features" in group
        info["n_ready"] = int((_read_flags(group["done"]) >= 0).sum()) if has_features else 0
        return info
    except Exception:  # noqa: BLE001
        return None


def stored_contrast_limits(path, default="auto"):
    """The normalisation recorded in the store at ``path``: (low, high) or None; ``default``
    when there is no readable store there (what ``contrast_limits="stored"`` resolves to)."""
    info = read_store_info(path)
    try:
        limits = info["normalisation"]["contrast_limits"]
        if limits is None:
            return None
        low, high = (float(v) for v in limits)
        return low, high
    except (KeyError, TypeError, ValueError):
        return default


# ---------------------------------------------------------------- signatures in words
def _differences(stored: dict, signature: dict) -> tuple[str, ...]:
    """Signature keys whose values differ (:data:`INFO_KEYS` ignored)."""
    keys = list(signature) + [k for k in stored if k not in signature]
    return tuple(k for k in keys if k not in INFO_KEYS and stored.get(k) != signature.get(k))


def _stored_slice_count(stored: dict) -> int | None:
    try:
        data = stored["data"]
        return int(data["shape"][int(data["axis"])])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _short(value) -> str:
    """A value for a message: floats to 6 significant digits, long hex digests cut to 12
    characters."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return re.sub(r"([0-9a-f]{12})[0-9a-f]{20,}", r"\1…", str(value))


def _describe(changed: tuple[str, ...], stored: dict, now: dict) -> str:
    """What differs, in words: "data (shape … in the store, … now); model (…)"."""

    def pair(a, b) -> str:
        return f"{_short(a)} in the store, {_short(b)} now"

    parts = []
    for key in changed:
        a, b = stored.get(key), now.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k} {pair(a.get(k), b.get(k))}" for k in ("shape", "dtype", "axis")
                    if a.get(k) != b.get(k)]
            parts.append(f"data ({'; '.join(diff) or 'same shape, other pixels'})")
        elif key == "normalisation" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k.replace('_', ' ')} {pair(a.get(k), b.get(k))}"
                    for k in ("contrast_limits", "percentiles") if a.get(k) != b.get(k)]
            parts.append(f"normalisation ({'; '.join(diff) or pair(a, b)})")
        elif key == "input_size" and ("original_size" in changed or "image_size" in changed):
            continue  # follows from those
        else:
            label = {"format": "store format", "image_size": "model input size",
                     "original_size": "image size", "storage_dtype": "storage dtype"}.get(key, key)
            parts.append(f"{label} ({pair(a, b)})")
    return "; ".join(parts)


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
    # overwrite=False: only ever created where there is none (zarr's overwrite would empty
    # the whole sub-folder, a user's file in it included)
    if _zarr_v3():
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                  fill_value=fill_value, compressors=None, overwrite=False)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype,
                                fill_value=fill_value, compressor=None, overwrite=False)


_CHUNK_KEY = re.compile(r"\d+(\.\d+)*")
_ARRAY_METADATA = (".zarray", ".zattrs", ".zmetadata")


def _remove_array(folder: Path) -> None:
    """Delete a zarr-2 array we wrote: its metadata and chunk files, and the folder if that
    leaves it empty. Any other file (a user's) stays."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_file() and (entry.name in _ARRAY_METADATA or _CHUNK_KEY.fullmatch(entry.name)):
            entry.unlink()
    try:
        folder.rmdir()
    except OSError:  # something of the user's is in there: keep it
        log.warning("kept %s: it holds files napari-sam did not write", folder)


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
