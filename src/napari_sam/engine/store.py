"""A persistent embedding store: a stack is encoded once, ever.

Layout (a zarr group in zarr *format 2*, so that zarr>=2.16 and zarr 3 both read it)::

    STACK.zarr/
      .napari-sam-store   marker: this folder was made by us
      .zgroup, .zattrs    {"napari_sam_store": signature}
      features/           (N*T, C, He, We) float16 (or float32), one chunk per item, raw
      done/               (N*T,) int64, one chunk per item: -1 = missing, else the crc32
                          of that item's stored bytes

An *item* is one encoder input: a whole slice (untiled store, T = 1: item i is slice i,
exactly the layout of napari-sam 0.1.0), or tile k of slice i (tiled store: item
``i * T + k``, T tiles per slice, see :mod:`napari_sam.engine.tiling`), each tile encoded
at full resolution.

Signature (what a store *is*): store format (:data:`FORMAT_VERSION`), data hash (shape,
dtype, axis and the pixels — all of them up to 64 MiB, else evenly spaced sampled slices,
or tiles of a tiled store), model signature (type + checkpoint sha256), model input size,
normalisation (ONE set of contrast limits for the whole stack, so slices and tiles are
comparable), slice and resized item sizes, storage dtype and — tiled stores only — the
tiling (``{"tile_shape", "halo"}``; an untiled store has no ``tiling`` key, as before).
``package_version`` is recorded for information only: upgrading napari-sam never
invalidates a store; a change of layout bumps :data:`FORMAT_VERSION` instead.

Nothing is ever deleted silently. A store made for something else (another tiling
included) is, by ``on_mismatch``:

* ``"error"`` (default): refused with :class:`StoreMismatchError` saying what differs;
* ``"recompute"``: cleared — only what the store wrote itself (``features``, ``done``, the
  group metadata and the marker; never the folder, never a file of the user's) — and
  recomputed;
* ``"read_only"``: used as it is, never written; stored items are served even if they were
  made from other pixels or another normalisation (the status says so), missing items are
  encoded in memory only. A store of another model, image size or tiling is unusable:
  refused.

A store that cannot be opened (unreadable metadata, flags of the wrong shape…) is refused
with :class:`StoreReadError` naming the path and the cause, and left exactly as it is.

Write protocol, robust to crashes, full disks and partial writes: ``done[i] = -1`` (if it
was set), then ``features[i]``, then ``done[i] = crc``. An item counts only when its flag
is set *and* its bytes match the crc, checked on every read: a truncated, missing or
corrupt chunk is marked missing and recomputed, never returned and never a crash.

RAM stays bounded whatever the stack length: items are read (a tile: only its region),
encoded and written one at a time; only the flags are held. Reads and writes take one
lock (a worker precomputing and the GUI thread reading may share a store). Several
processes may write one store when each writes its own items (one writer per chunk): see
:meth:`EmbeddingStore.attach` and :mod:`napari_sam.engine.distributed`.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np
import torch

from .predictor import ImageEmbedding
from .stack import (  # noqa: F401 - re-exported
    FULL_HASH_BYTES,
    StackView,
    VolumeEmbeddings,
    _as_predictor,
    _EmbeddingSource,
    _resolve_limits,
    data_hash,
    volume_contrast_limits,
)
from .store_files import (  # noqa: F401 - re-exported
    PrecomputeProgress,
    PrecomputeResult,
    StoreError,
    StoreMismatchError,
    StoreReadError,
    StoreStatus,
    StoreWriteError,
    _StoreFiles,
)
from .store_format import (  # noqa: F401 - re-exported
    FORMAT_VERSION,
    MARKER,
    TILINGS,
    _describe,
    _differences,
    _resolve_grid,
    make_signature,
    read_store_info,
    stored_contrast_limits,
    stored_tiling,
)
from .tiled_predictor import TiledEmbedding
from .tiling import Tile

log = logging.getLogger(__name__)

ON_MISMATCH = ("error", "recompute", "read_only")
MEMORY_CACHE = 4  # read-only stores: items encoded in memory, the last few kept


class EmbeddingStore(_StoreFiles, _EmbeddingSource):
    """Embeddings of a stack on disk. Open with :meth:`open`; see the module docstring.

    Attributes: ``path``, ``status`` (:class:`StoreStatus`), ``read_only`` (bool),
    ``contrast_limits`` ((low, high) or None: the normalisation used for this stack — the
    store's own with ``contrast_limits="stored"``), ``signature`` (dict), ``grid``
    (:class:`~napari_sam.engine.tiling.TileGrid` of each slice, or None: untiled),
    ``n_tiles`` (T, 1 when untiled), ``n_items`` (N x T), ``ready`` ((N x T,) per item),
    ``slices_ready`` ((N,) per slice). ``len(store)`` is the number of slices N.
    """

    @classmethod
    def open(cls, path, volume, predictor, *, axis: int = 0, contrast_limits="auto",
             dtype: str = "float16", on_mismatch: str = "error", tiling="off",
             tile_shape=None, halo=None) -> EmbeddingStore:
        """Open (or create) the store at ``path`` for ``volume`` and a model.

        Args:
            path: folder of the store (``.zarr``); created if missing.
            volume: the stack, see :class:`StackView` (read lazily; a 2D image: see
                :func:`~napari_sam.engine.stack.single_image_stack`).
            predictor: :class:`SamPredictor` or model used to encode missing items.
            axis: stacking axis of ``volume``.
            contrast_limits: "auto" (robust percentiles of the whole stack: of sampled
                slices, or sampled tiles when tiled), "stored" (the normalisation recorded
                in the store at ``path`` if there is a readable one, else "auto"), None
                (uint8 pass-through / per-item robust percentiles), or (low, high).
            dtype: "float16" or "float32" storage of a new store (an existing one keeps its own).
            on_mismatch: what to do with a store made for something else: "error" (raise
                :class:`StoreMismatchError`), "recompute" (clear what the store wrote and
                recompute) or "read_only" (use it as it is, never write it).
            tiling: "off" (default: each slice squeezed into one model input), "auto" /
                "on" / ``tile_shape`` / ``halo`` as
                :func:`~napari_sam.engine.tiling.tile_grid` (with the model's input size;
                a slice that fits one tile is not tiled), "stored" (the tiling recorded in
                the store at ``path``, else "auto"), or a
                :class:`~napari_sam.engine.tiling.TileGrid` of a slice.
        Raises:
            ValueError: bad arguments, or ``path`` is a file / a foreign non-empty folder.
            StoreMismatchError: signature differs and ``on_mismatch="error"``, or the store
                is of another model / image size / tiling and ``on_mismatch="read_only"``.
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
        predictor = _as_predictor(predictor)
        grid = _resolve_grid(path, view, predictor.model.image_size, tiling, tile_shape, halo)
        self = cls(view, predictor, _resolve_limits(view, contrast_limits, grid), grid)
        self._setup(path, dtype)
        self.signature = self._make_signature()
        self.status = self._open_or_create(on_mismatch)
        if self.status.state != "created":
            (log.info if self.status.state == "reused" else log.warning)(self.status.message)
        return self

    def _make_signature(self, hashed: str | None = None) -> dict:
        return make_signature(self.view, self.predictor.model, self.contrast_limits, self.grid,
                              self.input_size, self.dtype.name, hashed)

    # ------------------------------------------------------------ items
    @property
    def ready(self) -> np.ndarray:
        """(N x T,) bool: items stored (not yet re-verified; reads verify); (N,) untiled."""
        return self._done >= 0

    @property
    def slices_ready(self) -> np.ndarray:
        """(N,) bool: slices whose every tile is stored."""
        return self.ready.reshape(len(self), self.n_tiles).all(axis=1)

    def item(self, index: int, tile: int | Tile = 0) -> int:
        """The item of tile ``tile`` (its index in ``grid.tiles``, or the Tile) of slice
        ``index``: ``index * n_tiles + tile``."""
        index = self._check_index(index)
        k = tile.index if isinstance(tile, Tile) else int(tile)
        if not 0 <= k < self.n_tiles:
            raise ValueError(f"expected a tile index in [0, {self.n_tiles - 1}], got {k}")
        if isinstance(tile, Tile) and (self.grid is None or self.grid.tiles[k] != tile):
            raise ValueError(f"expected a tile of this store's grid, got {tile}")
        return index * self.n_tiles + k

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise ValueError(f"expected a slice index in [0, {len(self) - 1}], got {index}")
        return int(index)

    def _check_item(self, item: int) -> int:
        if not 0 <= item < self.n_items:
            what = "a slice" if self.grid is None else "an item"
            raise ValueError(f"expected {what} index in [0, {self.n_items - 1}], got {item}")
        return int(item)

    def _name(self, item: int) -> str:
        if self.grid is None:
            return f"slice {item}"
        return f"tile {item % self.n_tiles} of slice {item // self.n_tiles}"

    def get(self, item: int) -> ImageEmbedding | None:
        """The stored embedding of ``item`` (the slice index when untiled; see :meth:`item`)
        ((1, C, He, We) float32), or None when missing or damaged (a damaged item is marked
        missing, to be recomputed)."""
        item = self._check_item(item)
        with self._lock:
            crc = int(self._done[item])
            if crc < 0 or self._features is None:
                return None
            try:
                data = np.asarray(self._features[item])
                ok = data.dtype == self.dtype and zlib.crc32(data.tobytes()) == crc
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt chunk: recompute it
                log.debug("%s unreadable: %s", self._name(item), exc)
                ok = False
            if not ok:
                log.warning("store %s: %s is damaged; it will be recomputed", self.path,
                            self._name(item))
                self._set_flag(item, -1)
                return None
        return self._embedding_of(data)

    def put(self, item: int, embedding: ImageEmbedding) -> ImageEmbedding:
        """Store ``embedding`` as ``item`` (the slice index when untiled; see :meth:`item`);
        returns it at storage precision. Writes only that item's chunks: processes writing
        different items of one store never write the same file.

        Raises:
            ValueError: the embedding is for another model or item size, or overflows.
            StoreWriteError: the write failed (disk full…); the item stays missing.
            StoreError: the store is read-only.
        """
        item = self._check_item(item)
        if self.read_only:
            raise StoreError(f"store {self.path} is read-only: {self._name(item)} cannot be stored")
        if (embedding.model_signature != self.signature["model"]
                or tuple(embedding.original_size) != self.item_size
                or tuple(embedding.input_size) != self.input_size):
            raise ValueError(f"expected an embedding of a {self.item_size} item by "
                             f"{self.signature['model']}, got {embedding.original_size} by "
                             f"{embedding.model_signature}")
        data = embedding.features[0].detach().cpu().float().numpy().astype(self.dtype)
        if not np.isfinite(data).all():
            raise ValueError(f"expected features finite in {self.dtype.name}, got overflow: "
                             "use dtype='float32'")
        with self._lock:
            try:
                self._ensure_features(data.shape)
                if self._done[item] != -1:  # stored (or unknown, attached): clear it first
                    self._set_flag(item, -1, raise_errors=True)
                self._features[item] = data  # 1) the data ...
                self._set_flag(item, zlib.crc32(data.tobytes()), raise_errors=True)  # 2) the flag
            except OSError as exc:
                stored = "" if self.status.state == "attached" else f"{self._ready_words()} are stored and valid — "
                raise StoreWriteError(
                    f"could not write {self._name(item)} to {self.path} ({exc.strerror or exc}); "
                    f"{stored}free some space and run again to resume") from exc
        return self._embedding_of(data)

    def _embedding_of(self, data: np.ndarray) -> ImageEmbedding:
        """(C, He, We) stored array -> (1, C, He, We) float32 :class:`ImageEmbedding`."""
        features = torch.from_numpy(data.astype(np.float32))[None]
        return ImageEmbedding(features, self.item_size, self.input_size, self.signature["model"])

    def refresh(self) -> None:
        """Re-read the flags (and the features array) from disk: items stored meanwhile by
        other processes (a cluster run) become ready."""
        with self._lock:
            self._load(mode="r" if self.read_only else "a")

    def _note_stored(self, item: int, crc: int) -> None:
        """Record in memory that another process stored ``item`` with ``crc`` (reads verify
        it as always)."""
        self._done[self._check_item(item)] = int(crc)

    def embedding(self, index: int) -> ImageEmbedding:
        """Slice ``index``'s embedding (untiled stores): from disk, or encoded now and stored
        (read-only: kept in memory, the last few). A failed write is logged and the
        embedding still returned (interactive use goes on). Tiled stores:
        :meth:`tile_embedding`, :meth:`tiled_embedding`."""
        if self.grid is not None:
            raise ValueError(f"expected an untiled store, got one of {self.n_tiles} tiles per slice: "
                             "use tile_embedding(index, tile) or tiled_embedding(index)")
        return self.item_embedding(self._check_index(index))

    def tile_embedding(self, index: int, tile: int | Tile) -> ImageEmbedding:
        """(1, C, He, We) embedding of tile ``tile`` (index in ``grid.tiles``, or the Tile)
        of slice ``index``, of a (h, w) tile (``original_size == grid.tile_hw``): stored, or
        encoded now (reading only that tile) and stored."""
        return self.item_embedding(self.item(index, tile))

    def tiled_embedding(self, index: int) -> TiledEmbedding:
        """Every tile of slice ``index`` (stored, or encoded now and stored) as a
        :class:`~napari_sam.engine.tiled_predictor.TiledEmbedding` (for
        ``TiledPredictor.set_tiled_embedding``; ``TiledPredictor.set_tiles(store.grid,
        lambda k: store.tile_embedding(index, k))`` fetches tiles on demand instead)."""
        if self.grid is None:
            raise ValueError("expected a tiled store, got an untiled one: use embedding(index)")
        index = self._check_index(index)
        tiles = tuple(self.tile_embedding(index, k) for k in range(self.n_tiles))
        return TiledEmbedding(self.grid, tiles, self.contrast_limits)

    def item_embedding(self, item: int) -> ImageEmbedding:
        """The embedding of ``item`` (see :meth:`item`): stored, or encoded and stored."""
        stored = self.get(item)
        if stored is not None:
            return stored
        if self.read_only:
            with self._lock:
                if item in self._memory:
                    self._memory.move_to_end(item)
                    return self._memory[item]
            fresh = self.encode_item(item)
            with self._lock:
                self._memory[item] = fresh
                while len(self._memory) > MEMORY_CACHE:
                    self._memory.popitem(last=False)
            return fresh
        fresh = self.encode_item(item)
        try:
            return self.put(item, fresh)
        except StoreWriteError as exc:
            log.warning("%s", exc)
            return fresh

    # ------------------------------------------------------------ long work
    def precompute(self, center: int | Callable[[], int] = 0, *, cancel=None
                   ) -> Generator[PrecomputeProgress, None, PrecomputeResult]:
        """Encode and store every missing item, slices nearest to ``center`` first
        (outward: c, c+1, c-1, c+2, …; a slice's tiles in grid order). ``center`` may be a
        callable (e.g. the slice on screen), asked before each item. Stop by closing the
        generator or setting ``cancel`` (``threading.Event``): every item yielded so far is
        committed, nothing half.

        Raises:
            StoreError: at once, if the store is read-only.
            StoreWriteError: a write failed; items stored before it stay valid.
        """
        self._check_writable()
        return self._precompute(center, cancel)

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"store {self.path} is read-only ({self.status.message}): nothing "
                             "can be precomputed into it; open it with on_mismatch='recompute' "
                             "to recompute it, or choose another store path")

    def _precompute(self, center, cancel) -> Generator[PrecomputeProgress, None, PrecomputeResult]:
        start, computed, cancelled = time.perf_counter(), 0, False
        while True:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            missing = self.missing_items(center() if callable(center) else center)
            if not missing:
                break
            self.put(missing[0], self.encode_item(missing[0]))
            computed += 1
            yield self.progress(missing[0], computed)
        return self.result(computed, cancelled, time.perf_counter() - start)

    def progress(self, item: int, computed: int) -> PrecomputeProgress:
        """The :class:`PrecomputeProgress` after ``item`` was stored (``computed`` so far)."""
        return PrecomputeProgress(item, int(self.ready.sum()), self.n_items, computed, self.n_tiles)

    def result(self, computed: int, cancelled: bool, seconds: float) -> PrecomputeResult:
        return PrecomputeResult(computed, int(self.ready.sum()), self.n_items, cancelled, seconds)

    def verify(self) -> Generator[int, None, int]:
        """Re-read every ready item and check its crc (yields items); returns how many were
        damaged (now marked missing, so :meth:`precompute` recomputes them)."""
        damaged = 0
        for item in np.flatnonzero(self.ready):
            damaged += self.get(int(item)) is None
            yield int(item)
        return damaged

    def missing_items(self, center: int = 0) -> list[int]:
        """Missing items in :meth:`precompute`'s order: slices by distance to ``center``
        (on ties the slice after the centre first), a slice's tiles in grid order."""
        missing = np.flatnonzero(self._done < 0)
        if missing.size == 0:
            return []
        center = min(max(int(center), 0), len(self) - 1)
        slices = missing // self.n_tiles
        order = np.lexsort((missing, slices < center, np.abs(slices - center)))
        return [int(v) for v in missing[order]]


def outward_order(n: int, center: int) -> list[int]:
    """[c, c+1, c-1, c+2, c-2, …] clipped to [0, n): the order :meth:`precompute` follows."""
    center = min(max(int(center), 0), n - 1)
    order = [center]
    for d in range(1, n):
        order += [i for i in (center + d, center - d) if 0 <= i < n]
    return order
