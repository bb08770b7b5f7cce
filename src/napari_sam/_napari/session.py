"""``SamSession``: the model, its predictor and the embedding cache of one napari viewer.

Every napari-sam widget of a viewer (interactive prompts, segment everything, volume
propagation) works through the same session, so an image slice is encoded once and its
embedding is reused by all of them::

    from napari_sam._napari.session import session_for
    from napari_sam._napari.geometry import current_plane

    session = session_for(viewer)                  # one per viewer, created on demand
    session.load_model("vit_t")                    # or session.set_model(any_sam_model)
    plane = current_plane(viewer.dims, image_layer)  # the slice the viewer shows
    embedding = session.embedding(image_layer, plane)  # cached, or encoded now (blocking)
    session.predictor.set_embedding(embedding)     # then predictor.predict(...)

From the GUI thread use :meth:`SamSession.encode_job` with a
:class:`~napari_sam._napari.jobs.JobRunner` instead of blocking calls.
:class:`SliceEmbeddings` gives a whole stack axis (for volume propagation) through the
same cache.

Cache keys (:class:`~napari_sam.engine.EmbeddingKey`) hold the layer's ``unique_id`` plus
a data version (bumped when ``layer.data`` is replaced), the slice index (see
:class:`~napari_sam._napari.geometry.SlicePlane`), the model signature and the contrast
limits used for normalisation. A changed model or contrast gives new keys; replacing a
layer's data or removing the layer drops its entries (and nothing else).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np
from psygnal import Signal

from ..engine import (
    EmbeddingCache,
    EmbeddingKey,
    ImageEmbedding,
    SamPredictor,
    build_sam,
)
from ..engine.tiling import TileGrid
from .geometry import SlicePlane, base_data, plane_pixels
from .jobs import as_generator
from .levels import (
    LevelView,
    default_level,
    is_multiscale,
    layer_of,
    level_shapes,
    source_of,
)
from .tiles import MAX_CACHED_TILES, TileSource, TilingSettings

DEFAULT_CACHE_SIZE = 16  # 16 x 4 MiB for 1024-pixel models


def _signature(model) -> str:
    return getattr(model, "signature", type(model).__name__)


class SamSession:
    """Model + predictor + embedding cache, shared by the widgets of one viewer.

    Args:
        cache_size: how many slice embeddings to keep in memory (LRU; 4 MiB each for SAM).

    Large planes are tiled (:attr:`tiling`, :meth:`set_tiling`, :meth:`grid_for`,
    :meth:`tile_source`); multiscale layers are segmented on one level
    (:meth:`level_for`, :meth:`set_level`, :meth:`source_for`).

    Signals (emitted on the GUI thread):
        model_changed(model): after :meth:`set_model` / :meth:`load_model`.
        tiling_changed(): after :meth:`set_tiling` or :meth:`set_level`.
        embeddings_changed(): a widget cached new embeddings (tiles) — for status lines.
    """

    model_changed = Signal(object)
    tiling_changed = Signal()
    embeddings_changed = Signal()

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.cache = EmbeddingCache(cache_size)
        self._cache_size = int(cache_size)
        self.tiling = TilingSettings()
        self._levels: dict[object, int] = {}
        self._model = None
        self._predictor: SamPredictor | None = None
        self._versions: dict[object, int] = {}
        self._watched: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stores: dict[tuple, object] = {}  # (layer id, level) -> EmbeddingStore

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        """The current model (a :class:`~napari_sam.model.Sam` or compatible), or None."""
        return self._model

    @property
    def predictor(self) -> SamPredictor:
        """The session's :class:`~napari_sam.engine.SamPredictor` (GUI-thread use only)."""
        if self._predictor is None:
            raise RuntimeError("no model is loaded: call load_model() or set_model() first")
        return self._predictor

    @property
    def has_model(self) -> bool:
        return self._model is not None

    def load_model(self, model_type="vit_t", checkpoint=None, device=None, precision="auto",
                   decoder_checkpoint=None):
        """Build a model with :func:`~napari_sam.engine.build_sam` and make it current.

        Blocking (download + load): from the GUI, build in a worker (as the widget's Load
        button does) and call :meth:`set_model` on the GUI thread.
        Args: as ``build_sam`` — model_type a zoo name ("vit_t", "vit_b_lm", … or a
        ``SamConfig``), checkpoint path (None = published file(s), downloaded once),
        device None/"auto" | "cpu" | "cuda" | "mps", precision "auto" | "fp32" | "bf16" | "fp16",
        decoder_checkpoint: a separate AIS decoder file (micro-sam's ``*_decoder.pt``).
        Returns the model.
        """
        model = build_sam(model_type, checkpoint=checkpoint, device=device, precision=precision,
                          decoder_checkpoint=decoder_checkpoint)
        self.set_model(model)
        return model

    def set_model(self, model) -> None:
        """Use ``model`` (any object with the Sam engine interface, e.g. a test oracle).

        Embeddings of the previous model are dropped from the cache.
        """
        if model is None:
            raise ValueError("expected a SAM model, got None")
        with self._lock:
            old = self._model
            self._model = model
            self._predictor = SamPredictor(model)
        if old is not None and _signature(old) != _signature(model):
            self.cache.invalidate(model_signature=_signature(old))
        try:
            self.tiling.check(model.image_size)
        except ValueError:  # a halo too large for this model's tiles: back to the default
            self.tiling = dataclasses.replace(self.tiling, halo=None)
        self.model_changed.emit(model)

    @property
    def cache_size(self) -> int:
        """How many slice embeddings are kept (tiles of a tiled plane get room on top,
        up to :data:`~napari_sam._napari.tiles.MAX_CACHED_TILES`)."""
        return self._cache_size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        extra = self.cache.max_items - self._cache_size
        self.cache.max_items = int(value) + extra
        self._cache_size = int(value)

    # ------------------------------------------------------------------ tiles and levels
    def set_tiling(self, mode: str = "auto", tile_shape=None, halo=None) -> None:
        """Tile planes: ``mode`` "auto" | "on" | "off", ``tile_shape`` (h, w) or one int
        (None: the model's input size), ``halo`` (None: an eighth of the tile). Cached tiles
        of other settings are not used again (their keys differ)."""
        settings = TilingSettings(mode, tile_shape, halo)
        settings.check(getattr(self._model, "image_size", 1024))
        if settings != self.tiling:
            self.tiling = settings
            self.tiling_changed.emit()

    def grid_for(self, source, plane: SlicePlane) -> TileGrid | None:
        """The tiling of ``plane`` of ``source`` (a layer or a level) with the current
        settings and model, or None (one encode for the plane)."""
        if self._model is None:
            return None
        return self.tiling.grid(plane.shape_hw, self._model.image_size)

    def level_for(self, layer) -> int:
        """The level of a multiscale ``layer`` that is segmented: the user's choice, else
        :func:`~napari_sam._napari.levels.default_level` (0 when tiled). 0 for plain layers."""
        if not is_multiscale(layer):
            return 0
        chosen = self.chosen_level(layer)
        if chosen is not None:
            return chosen
        size = getattr(self._model, "image_size", 1024)
        full_hw = level_shapes(layer)[0][-2:]
        return default_level(layer, size, self.tiling.grid(full_hw, size) is not None)

    def chosen_level(self, layer) -> int | None:
        """The level the user chose for ``layer``, or None (the default applies)."""
        return self._levels.get(_layer_id(layer))

    def set_level(self, layer, level: int | None) -> None:
        """Segment level ``level`` of multiscale ``layer`` (None: back to the default)."""
        if level is not None:
            LevelView(layer, level)  # validates
        lid = _layer_id(layer)
        if self._levels.get(lid) != level:
            if level is None:
                self._levels.pop(lid, None)
            else:
                self._levels[lid] = int(level)
            self.tiling_changed.emit()

    def source_for(self, layer):
        """What is segmented of ``layer``: the layer, or a :class:`LevelView` of its level."""
        return source_of(layer, self.level_for(layer))

    def tile_source(self, source, plane: SlicePlane, grid: TileGrid) -> TileSource:
        """The tiles of ``plane`` (GUI thread: captures data, keys, normalisation, store).
        Makes room in the cache for them (up to ``MAX_CACHED_TILES``)."""
        self.cache.max_items = max(self.cache.max_items, self._cache_size + min(len(grid), MAX_CACHED_TILES))
        return TileSource(self, source, plane, grid, base_data(source), self.key_for(source, plane),
                          self.store_for(source))

    def stored_tile(self, store, plane: SlicePlane, grid: TileGrid, key: EmbeddingKey):
        """(store, slice index) when the tiles of ``plane`` can come from ``store`` (a
        store of the same tiling, model and normalisation), else None."""
        if store is None or getattr(store, "grid", None) != grid:
            return None
        return self._store_index(store, plane, key)

    def predictor_for(self, key: EmbeddingKey) -> SamPredictor:
        """The predictor to encode ``key`` with (any thread); refuses when the model changed."""
        predictor = self._predictor
        if predictor is None:
            raise RuntimeError("no model is loaded: call load_model() or set_model() first")
        if _signature(predictor.model) != key.model_signature:
            raise RuntimeError("the model changed while this job ran: start it again")
        return predictor

    # ------------------------------------------------------------------ keys
    def key_for(self, layer, plane: SlicePlane) -> EmbeddingKey:
        """The cache key of ``plane`` of image ``layer`` for the current model."""
        if self._model is None:
            raise RuntimeError("no model is loaded: call load_model() or set_model() first")
        self._watch(layer_of(layer))
        source = (_layer_id(layer), self._versions.get(_layer_id(layer), 0))
        if isinstance(layer, LevelView):
            source += (("level", layer.level),)
        return EmbeddingKey(source, plane.index, _signature(self._model), self.normalisation_for(layer))

    def normalisation_for(self, layer) -> tuple:
        """How ``layer``'s pixels become SAM input: the attached store's normalisation when
        the layer has a store (stored embeddings must stay valid), else the layer's
        contrast limits (SAM sees what the user sees). See :func:`normalisation`."""
        store = self.store_for(layer)
        if store is not None:
            limits = store.contrast_limits
            return ("store",) if limits is None else ("contrast", *(float(v) for v in limits))
        return normalisation(layer)

    def invalidate_layer(self, layer) -> int:
        """Forget every embedding of ``layer`` (call it after editing its data in place)."""
        lid = _layer_id(layer)
        for key in [k for k in self._stores if k[0] == lid]:
            self._stores.pop(key)  # made for the old data
        dropped = sum(self.cache.invalidate(source=k.source) for k in self.cache.keys() if k.source[0] == lid)
        self._versions[lid] = self._versions.get(lid, 0) + 1
        return dropped

    def _watch(self, layer) -> None:
        if layer in self._watched:
            return
        self._watched.add(layer)
        ref = weakref.ref(layer)

        def on_data(event=None):
            if (lay := ref()) is not None:
                self.invalidate_layer(lay)

        layer.events.data.connect(on_data)

    # ------------------------------------------------------------------ embeddings
    def cached_embedding(self, layer, plane: SlicePlane) -> ImageEmbedding | None:
        """The cached embedding of ``plane``, or None (never encodes)."""
        return self.cache.get(self.key_for(layer, plane))

    def activate(self, layer, plane: SlicePlane) -> bool:
        """Make the cached embedding of ``plane`` current in :attr:`predictor`.

        Returns False (and changes nothing) when it is not cached yet.
        """
        embedding = self.cached_embedding(layer, plane)
        if embedding is None:
            return False
        self.predictor.set_embedding(embedding)
        return True

    def embedding(self, layer, plane: SlicePlane) -> ImageEmbedding:
        """The embedding of ``plane``: from the cache, or encoded now (blocking)."""
        key = self.key_for(layer, plane)
        return self._cached_or_encoded(base_data(layer), plane, key, self.store_for(layer))

    def encode_job(self, layer, plane: SlicePlane):
        """``(key, job)``: the encoding of ``plane`` as a one-step generator for a
        :class:`~napari_sam._napari.jobs.JobRunner`. Everything it needs from the layer
        (data array, normalisation, attached store) is read here, on the GUI thread; the
        job returns ``(key, embedding)`` and puts the embedding into the cache unless the
        model changed meanwhile."""
        key = self.key_for(layer, plane)
        data, store = base_data(layer), self.store_for(layer)

        return key, as_generator(lambda: (key, self._cached_or_encoded(data, plane, key, store)))

    # ------------------------------------------------------------------ stores
    def attach_store(self, layer, store) -> None:
        """Serve ``layer``'s slices from ``store`` (an :class:`~napari_sam.engine.store.
        EmbeddingStore` of the layer's 3D data, stack axis = the hidden axis; a tiled store
        serves tiles): a stored slice or tile costs no encoder call, a missing one is
        encoded and stored. Used only while the model and the layer's contrast match the
        store's. ``layer`` may be a :class:`LevelView`: the store belongs to that level.
        None detaches."""
        if store is None:
            self._stores.pop(_store_key(layer), None)
        else:
            self._stores[_store_key(layer)] = store

    def store_for(self, layer):
        """The store attached to ``layer`` (or to that level of it), or None."""
        return self._stores.get(_store_key(layer))

    def _store_index(self, store, plane: SlicePlane, key: EmbeddingKey):
        """(store, slice index) when ``plane`` can come from ``store``, else None."""
        if store is None or store.predictor.model is not self._model or plane.ndim not in (2, 3):
            return None
        limits = contrast_limits_of(key.normalisation)
        if limits != (None if store.contrast_limits is None else tuple(store.contrast_limits)):
            return None
        if plane.ndim == 2:  # a 2D image: a store of one slice
            return (store, 0) if tuple(plane.axes_rc) == (0, 1) and len(store) == 1 else None
        axis = store.view.axis
        if tuple(plane.axes_rc) != tuple(a for a in range(3) if a != axis):
            return None  # transposed view: not the stored orientation
        return store, plane.index[axis]

    def _cached_or_encoded(self, data, plane: SlicePlane, key: EmbeddingKey, store) -> ImageEmbedding:
        """The embedding of ``plane`` of the array ``data`` (any thread): from the cache,
        the layer's ``store`` (None: no store), or encoded now (reading only this plane).
        Uses the predictor current at call time; touches no state but the thread-safe
        cache and the store (which locks), and nothing of the layer."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        predictor = self.predictor_for(key)
        stored = self._store_index(store, plane, key)
        if stored is not None and getattr(stored[0], "grid", None) is not None:
            stored = None  # a tiled store holds tiles, not this plane in one piece
        if stored is not None:
            embedding = stored[0].embedding(stored[1])  # from disk, or encoded and stored
            if predictor is self._predictor:
                self.cache.put(key, embedding)
            return embedding
        image = plane_pixels(data, plane)
        embedding = predictor.encode_image(image, contrast_limits=contrast_limits_of(key.normalisation))
        if predictor is self._predictor:  # the model did not change meanwhile
            self.cache.put(key, embedding)
        return embedding


def _layer_id(layer):
    layer = layer_of(layer)
    return getattr(layer, "unique_id", None) or id(layer)


def _store_key(source) -> tuple:
    """Stores belong to one level of a layer (level 0 of a plain layer)."""
    return _layer_id(source), getattr(source, "level", 0)


def contrast_limits_of(norm: tuple) -> tuple[float, float] | None:
    """The ``contrast_limits`` argument of the engine for a normalisation tuple."""
    return tuple(norm[1:]) if norm[0] == "contrast" else None


def normalisation(layer) -> tuple:
    """How pixels of ``layer`` become 8 bit: ("uint8",) unchanged, or ("contrast", lo, hi)
    with the layer's contrast limits, i.e. SAM sees what the user sees. (A layer with an
    embedding store attached uses the store's: ``SamSession.normalisation_for``.)"""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    lo, hi = (float(v) for v in layer.contrast_limits)
    if np.dtype(data.dtype) == np.uint8 and (lo, hi) == (0.0, 255.0):
        return ("uint8",)
    return ("contrast", lo, hi)


_SESSIONS: dict[int, tuple[weakref.ref, SamSession]] = {}


def real_viewer(viewer):
    """The viewer itself: napari hands each docked widget a proxy of the viewer
    (``PublicOnlyProxy``, a wrapt proxy); one viewer must give one session whatever proxy
    a widget got, so unwrap it."""
    for _ in range(8):  # proxies of proxies, in principle
        inner = getattr(viewer, "__wrapped__", None)
        if inner is None or inner is viewer:
            break
        viewer = inner
    return viewer


def session_for(viewer, create: bool = True) -> SamSession | None:
    """The :class:`SamSession` of ``viewer`` (one per viewer, created on first use).

    Keyed on the real viewer (proxies are unwrapped) and held weakly: every napari-sam
    widget of a viewer, however it was opened, gets the same session, which outlives
    closing and reopening a widget and goes with the viewer. Two viewers, two sessions.
    """
    viewer = real_viewer(viewer)
    entry = _SESSIONS.get(id(viewer))
    if entry is not None and entry[0]() is viewer:
        return entry[1]
    if not create:
        return None
    session = SamSession()
    key = id(viewer)

    def forget(ref, key=key):
        if _SESSIONS.get(key, (None,))[0] is ref:
            del _SESSIONS[key]

    _SESSIONS[key] = (weakref.ref(viewer, forget), session)
    return session


def drop_session(viewer) -> None:
    """Forget ``viewer``'s session (its model and embeddings); the next
    :func:`session_for` makes a new one. For a viewer reused by unrelated work (tests)."""
    _SESSIONS.pop(id(real_viewer(viewer)), None)


from .slices import SliceEmbeddings

__all__ = ["SamSession", "SliceEmbeddings", "contrast_limits_of", "drop_session", "normalisation",
           "real_viewer", "session_for"]
