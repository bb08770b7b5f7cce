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

From the GUI thread use :meth:`SamSession.encode_worker` instead of blocking calls: it
encodes in a napari ``thread_worker`` with a progress bar and emits ``embedding_ready``.
:class:`SliceEmbeddings` gives a whole stack axis (for volume propagation) through the
same cache.

Cache keys (:class:`~napari_sam.engine.EmbeddingKey`) hold the layer's ``unique_id`` plus
a data version (bumped when ``layer.data`` is replaced), the slice index (see
:class:`~napari_sam._napari.geometry.SlicePlane`), the model signature and the contrast
limits used for normalisation. A changed model or contrast gives new keys; replacing a
layer's data or removing the layer drops its entries (and nothing else).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
from psygnal import Signal

from ..engine import EmbeddingCache, EmbeddingKey, ImageEmbedding, SamPredictor, build_sam
from .geometry import SlicePlane, plane_image

DEFAULT_CACHE_SIZE = 16  # 16 x 4 MiB for 1024-pixel models


def _signature(model) -> str:
    return getattr(model, "signature", type(model).__name__)


class SamSession:
    """Model + predictor + embedding cache, shared by the widgets of one viewer.

    Args:
        cache_size: how many slice embeddings to keep in memory (LRU; 4 MiB each for SAM).

    Signals (emitted on the GUI thread):
        model_changed(model): after :meth:`set_model` / :meth:`load_model`.
        embedding_ready(key, embedding): an :meth:`encode_worker` finished.
    """

    model_changed = Signal(object)
    embedding_ready = Signal(object, object)

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.cache = EmbeddingCache(cache_size)
        self._model = None
        self._predictor: SamPredictor | None = None
        self._versions: dict[object, int] = {}
        self._watched: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stores: dict[object, object] = {}  # layer id -> EmbeddingStore

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

    def load_model(self, model_type="vit_t", checkpoint=None, device=None, precision="auto"):
        """Build a model with :func:`~napari_sam.engine.build_sam` and make it current.

        Blocking (download + load); the widget calls it in a worker thread.
        Args: as ``build_sam`` — model_type "vit_t" | "vit_b" | "vit_l" | "vit_h" (or a
        ``SamConfig``), checkpoint path (None = official file, downloaded once),
        device None/"auto" | "cpu" | "cuda" | "mps", precision "auto" | "fp32" | "bf16" | "fp16".
        Returns the model.
        """
        model = build_sam(model_type, checkpoint=checkpoint, device=device, precision=precision)
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
        self.model_changed.emit(model)

    @property
    def cache_size(self) -> int:
        return self.cache.max_items

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self.cache.max_items = int(value)

    # ------------------------------------------------------------------ keys
    def key_for(self, layer, plane: SlicePlane) -> EmbeddingKey:
        """The cache key of ``plane`` of image ``layer`` for the current model."""
        if self._model is None:
            raise RuntimeError("no model is loaded: call load_model() or set_model() first")
        self._watch(layer)
        source = (_layer_id(layer), self._versions.get(_layer_id(layer), 0))
        return EmbeddingKey(source, plane.index, _signature(self._model), normalisation(layer))

    def invalidate_layer(self, layer) -> int:
        """Forget every embedding of ``layer`` (call it after editing its data in place)."""
        lid = _layer_id(layer)
        self._stores.pop(lid, None)  # made for the old data
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
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        return self._encode(layer, plane, key)

    def encode_worker(self, layer, plane: SlicePlane, start: bool = True):
        """Encode ``plane`` in a napari ``thread_worker`` with a progress bar.

        The worker returns ``(key, embedding)``; connect to ``worker.returned`` (GUI
        thread) or to :attr:`embedding_ready`. The embedding goes into the cache unless the
        model changed meanwhile. Returns the worker (started unless ``start=False``).
        """
        from napari.qt.threading import create_worker

        key = self.key_for(layer, plane)  # read layer state (contrast) on the GUI thread
        worker = create_worker(
            self._encode_returning_key,
            layer,
            plane,
            key,
            _start_thread=False,
            _progress={"desc": f"SAM: encoding '{layer.name}' ({plane.describe()})"},
        )
        worker.returned.connect(lambda result: self.embedding_ready.emit(*result))
        if start:
            worker.start()
        return worker

    # ------------------------------------------------------------------ stores
    def attach_store(self, layer, store) -> None:
        """Serve ``layer``'s slices from ``store`` (an :class:`~napari_sam.engine.store.
        EmbeddingStore` of the layer's 3D data, stack axis = the hidden axis): a stored slice
        costs no encoder call, a missing one is encoded and stored. Used only while the
        model and the layer's contrast match the store's. None detaches."""
        if store is None:
            self._stores.pop(_layer_id(layer), None)
        else:
            self._stores[_layer_id(layer)] = store

    def store_for(self, layer):
        """The store attached to ``layer``, or None."""
        return self._stores.get(_layer_id(layer))

    def _store_index(self, layer, plane: SlicePlane, key: EmbeddingKey):
        """(store, slice index) when ``plane`` can come from the layer's store, else None."""
        store = self._stores.get(_layer_id(layer))
        if store is None or store.predictor.model is not self._model or plane.ndim != 3:
            return None
        axis = store.view.axis
        if tuple(plane.axes_rc) != tuple(a for a in range(3) if a != axis):
            return None  # transposed view: not the stored orientation
        limits = None if key.normalisation == ("uint8",) else tuple(key.normalisation[1:])
        if limits != (None if store.contrast_limits is None else tuple(store.contrast_limits)):
            return None
        return store, plane.index[axis]

    def _encode_returning_key(self, layer, plane, key):
        return key, self._encode(layer, plane, key)

    def _encode(self, layer, plane: SlicePlane, key: EmbeddingKey) -> ImageEmbedding:
        """Encode (any thread): uses the predictor current at call time, touches no state
        but the thread-safe cache."""
        predictor = self._predictor
        if predictor is None:
            raise RuntimeError("no model is loaded: call load_model() or set_model() first")
        stored = self._store_index(layer, plane, key)
        if stored is not None:
            embedding = stored[0].embedding(stored[1])  # from disk, or encoded and stored
            if predictor is self._predictor:
                self.cache.put(key, embedding)
            return embedding
        image = plane_image(layer, plane)
        limits = None if key.normalisation == ("uint8",) else key.normalisation[1:]
        embedding = predictor.encode_image(image, contrast_limits=limits)
        if predictor is self._predictor:  # the model did not change meanwhile
            self.cache.put(key, embedding)
        return embedding


class SliceEmbeddings:
    """The embeddings of ``layer``'s planes along one stack axis, through a session's cache.

    It is the ``embeddings`` argument of :func:`napari_sam.engine.volume.propagate`:
    ``len()``, ``embedding(i)`` (cached, or encoded on demand — blocking, fine in a
    worker thread) and ``original_size`` (H, W). Build it on the GUI thread.

    Args:
        session: the :class:`SamSession`.
        layer: the image layer.
        plane: any plane of the family (e.g. the shown one); its displayed axes are kept.
        axis: the data axis to walk (default: the first non-displayed axis).
    """

    def __init__(self, session: SamSession, layer, plane: SlicePlane, axis: int | None = None) -> None:
        hidden = [a for a in range(plane.ndim) if a not in plane.axes_rc]
        if axis is None:
            if not hidden:
                raise ValueError("expected a layer with a stack axis, got a 2D image")
            axis = hidden[0]
        if axis not in hidden:
            raise ValueError(f"expected a non-displayed axis among {hidden}, got {axis}")
        self.session, self.layer, self.template, self.axis = session, layer, plane, axis
        self.original_size = plane.shape_hw
        session.key_for(layer, plane)  # watch the layer from the GUI thread

    def __len__(self) -> int:
        shape = self.layer.data[0].shape if getattr(self.layer, "multiscale", False) else self.layer.data.shape
        return int(shape[self.axis])

    def plane(self, i: int) -> SlicePlane:
        index = list(self.template.index)
        index[self.axis] = int(i)
        return SlicePlane(self.template.axes_rc, tuple(index), self.template.shape_hw)

    def embedding(self, i: int) -> ImageEmbedding:
        return self.session.embedding(self.layer, self.plane(i))


def _layer_id(layer):
    return getattr(layer, "unique_id", None) or id(layer)


def normalisation(layer) -> tuple:
    """How pixels of ``layer`` become 8 bit: ("uint8",) unchanged, or ("contrast", lo, hi)
    with the layer's contrast limits, i.e. SAM sees what the user sees."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    lo, hi = (float(v) for v in layer.contrast_limits)
    if np.dtype(data.dtype) == np.uint8 and (lo, hi) == (0.0, 255.0):
        return ("uint8",)
    return ("contrast", lo, hi)


_SESSIONS: dict[int, tuple[weakref.ref, SamSession]] = {}


def session_for(viewer, create: bool = True) -> SamSession | None:
    """The :class:`SamSession` of ``viewer`` (one per viewer, created on first use).

    Stored per viewer object (weakly), never module-wide: two viewers have two sessions.
    """
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
