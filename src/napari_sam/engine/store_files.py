"""Files of an embedding store: creating, opening, clearing; errors, status, progress.

The :class:`_StoreFiles` part of :class:`~napari_sam.engine.store.EmbeddingStore` (see
:mod:`napari_sam.engine.store` for the layout, the signature and the write protocol).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .stack import StackView, _as_predictor
from .store_format import (
    ATTRS_KEY,
    MARKER,
    UNUSABLE_KEYS,
    _create_array,
    _describe,
    _differences,
    _open_group,
    _read_flags,
    _remove_array,
    _stored_slice_count,
)
from .tiling import TileGrid

if TYPE_CHECKING:
    from .store import EmbeddingStore

_UNKNOWN = -2  # flag of an attached store: not read (a put clears it on disk first)


class StoreError(RuntimeError):
    """Base class of store errors (also: a read-only store asked to write)."""


class StoreWriteError(StoreError):
    """Writing failed (disk full, permissions…); items already stored stay valid."""


class StoreReadError(StoreError):
    """An existing store could not be opened (unreadable metadata…); it was left as it is."""


class StoreMismatchError(StoreError):
    """The store was made for other data/model/normalisation/tiling (see ``on_mismatch``).

    Attributes: ``path``, ``changed`` (signature keys that differ, e.g. ("data",)),
    ``details`` (what differs, in words, e.g. "normalisation (contrast limits [0, 255] in
    the store, [0, 100] now)") and ``usable_read_only`` (False for another model, image
    size or tiling: its features cannot serve this model at all).
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
    ``on_mismatch="read_only"``: used as it is, never written), "attached"
    (:meth:`EmbeddingStore.attach`). ``changed``: the signature keys that differ ("data",
    "model", "normalisation", "tiling", …); ``message``: one line for a user.
    """

    state: str
    message: str
    changed: tuple[str, ...] = ()


class _StoreFiles:
    """Opening (:meth:`attach` for writer processes), creating and clearing the zarr files
    of a store; the flags."""

    @classmethod
    def attach(cls, path, volume, predictor, signature: dict) -> EmbeddingStore:
        """Open an existing store to write items into it from another process (a cluster
        worker), without hashing the data again: ``signature`` is the one of the store
        opened with :meth:`open` by the process that hands out the work (its normalisation
        and tiling are used as they are).

        Checks that the store at ``path`` has exactly ``signature`` (else
        :class:`StoreMismatchError`), that ``volume`` has its shape, dtype and axis and
        ``predictor``'s model is its model (else ValueError). The flags are not read:
        ``ready`` is all False and every :meth:`put` clears the item's flag on disk before
        writing its data (the write protocol holds whatever the flag was).
        """
        path, signature = Path(path), dict(signature)
        try:
            data = signature["data"]
            view = StackView(volume, int(data["axis"]))
            tiling = signature.get("tiling")
            limits = signature["normalisation"]["contrast_limits"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"expected a store signature, got one without {exc}") from None
        if [list(view.shape), view.dtype.str] != [list(data["shape"]), data["dtype"]]:
            raise ValueError(f"expected a stack of shape {data['shape']} and dtype {data['dtype']} "
                             f"for the store {path}, got {list(view.shape)} {view.dtype.str}")
        grid = None if tiling is None else TileGrid(view.slice_shape, tiling["tile_shape"],
                                                    tiling["halo"])
        limits = None if limits is None else tuple(float(v) for v in limits)
        self = cls(view, _as_predictor(predictor), limits, grid)
        self._setup(path, signature.get("storage_dtype", "float16"))
        made = self._make_signature(hashed=data["hash"])
        changed = _differences(signature, made)
        if changed:
            raise ValueError(f"expected the model and stack the store signature names, got a "
                             f"different {_describe(changed, signature, made)}")
        self.signature = signature
        if not (path / MARKER).is_file():
            raise StoreReadError(f"expected an embedding store at {path}, found none")
        changed = _differences(self._read_signature(), signature)
        if changed:
            details = _describe(changed, self._read_signature(), signature)
            raise StoreMismatchError(f"store {path} changed since the work was handed out: it "
                                     f"is now made for a different {details}", path, changed, details)
        self._load(mode="r+", read_flags=False)
        self.status = StoreStatus("attached", f"attached to store {path}")
        return self

    def _setup(self, path: Path, dtype: str) -> None:
        self.path, self.dtype, self._lock = path, np.dtype(dtype), threading.RLock()
        self.read_only = False
        self._memory: OrderedDict[int, object] = OrderedDict()  # read-only: items in RAM

    def _ready_words(self) -> str:
        """"3/10 slices" or "25/90 tiles" ready."""
        unit = "slices" if self.grid is None else "tiles"
        return f"{int(self.ready.sum())}/{self.n_items} {unit}"

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
            return StoreStatus("reused", f"reusing store {path}: {self._ready_words()} ready")
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
                   else "its features do not fit this model/image size/tiling")
            raise StoreMismatchError(
                f"store {path} cannot be used, even read-only: it was made for a different "
                f"{details} ({why}). Open it with on_mismatch='recompute' to clear and "
                "recompute it, or choose another store path", path, changed, details, False)
        self.read_only = True
        self._load(mode="r")
        return StoreStatus("read_only", f"store {path} is open read-only, made for a different "
                           f"{details}: its {self._ready_words()} stored are used as they are, "
                           "missing ones are encoded but not stored", changed)

    def _read_signature(self) -> dict:
        try:
            group = _open_group(self.path, mode="r")
            stored = dict(group.attrs)[ATTRS_KEY]
            if not isinstance(stored, dict):
                raise ValueError(f"expected a signature dict, got {type(stored).__name__}")  # noqa: TRY004
            return stored
        except Exception as exc:
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
            self._done_arr = _create_array(group, "done", (self.n_items,), (1,), "int64", -1)
        except OSError as exc:
            raise StoreWriteError(f"could not create the store {self.path}: {exc}") from exc
        self._done = np.full(self.n_items, -1, dtype=np.int64)

    def _clear(self) -> None:
        """Remove what the store wrote itself, nothing else (never the folder)."""
        try:
            for name in ("features", "done"):
                _remove_array(self.path / name)
            for name in (".zattrs", ".zgroup", MARKER):
                (self.path / name).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"could not clear the store {self.path}: {exc}") from exc

    def _load(self, mode: str, read_flags: bool = True) -> None:
        n = self.n_items
        try:
            group = _open_group(self.path, mode=mode)
            done = group["done"]
            if done.shape != (n,):
                raise ValueError(f"expected done flags of shape ({n},), got {done.shape}")
            features = group["features"] if "features" in group else None  # noqa: SIM401
            if features is not None and (features.shape[0] != n or features.ndim != 4):
                raise ValueError(f"expected features of shape ({n}, C, He, We), got {features.shape}")
            flags = _read_flags(done) if read_flags else np.full(n, _UNKNOWN, dtype=np.int64)
        except Exception as exc:
            raise self._unreadable(exc) from exc
        self._group, self._done_arr, self._features = group, done, features
        self._done = flags
        if features is None and read_flags:  # flags without data (a deleted folder): nothing is ready
            self._done[:] = -1

    def _ensure_features(self, shape: tuple[int, ...]) -> None:
        """Create the features array on the first write (or open it: another process of a
        distributed run may have created it meanwhile)."""
        if self._features is not None:
            return
        try:
            self._features = _create_array(self._group, "features", (self.n_items, *shape),
                                           (1, *shape), self.dtype.name, 0)
        except Exception:
            group = _open_group(self.path, mode="r+")
            if "features" not in group:
                raise
            self._group, self._features = group, group["features"]
        if tuple(self._features.shape) != (self.n_items, *shape):
            raise ValueError(f"expected features of shape {(self.n_items, *shape)} in {self.path}, "
                             f"got {tuple(self._features.shape)}")

    def _set_flag(self, item: int, value: int, raise_errors: bool = False) -> None:
        if not self.read_only:  # a read-only store only forgets in memory
            try:
                self._done_arr[item] = value
            except OSError:
                if raise_errors:
                    raise
        self._done[item] = value


@dataclass(frozen=True)
class PrecomputeProgress:
    """Yielded after each item is stored: item ``index`` just became ready.

    ``index``: the item (slice ``index // n_tiles``, tile ``index % n_tiles``; the slice
    itself in an untiled store); ``n_ready`` / ``n_slices``: items stored / all items (N x
    T; slices when untiled); ``n_computed``: items encoded by this run.
    """

    index: int
    n_ready: int
    n_slices: int
    n_computed: int
    n_tiles: int = 1

    @property
    def slice_index(self) -> int:
        return self.index // self.n_tiles

    @property
    def tile_index(self) -> int:
        return self.index % self.n_tiles


@dataclass(frozen=True)
class PrecomputeResult:
    """``n_computed``, ``n_ready``, ``n_slices``: items (slices x tiles), as in
    :class:`PrecomputeProgress`."""

    n_computed: int
    n_ready: int
    n_slices: int
    cancelled: bool
    seconds: float
