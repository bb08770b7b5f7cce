"""Background encoding of the shown slice for :class:`InteractiveSegmenter`.

One worker at a time. Requests made while it runs are coalesced: when it finishes, the
slice shown *then* is encoded (scrolling through 50 slices costs 2 encodings, not 50).
A finished embedding always goes to the cache, but reaches the predictor only if its key
(layer, data version, slice, model, contrast) is still the one on screen — a stale result
is never applied to the wrong slice.
"""

from __future__ import annotations

import time


class EncodingMixin:
    """Needs ``session``, ``image_layer``, ``plane``, ``auto_encode``, ``_status``,
    ``update_preview`` and ``changed`` from the class it is mixed into."""

    def _init_encoding(self) -> None:
        self._active = None  # (EmbeddingKey, ImageEmbedding) of the shown slice
        self._worker = None
        self._worker_key = None
        self._pending = False
        self._failed_key = None

    def _current_key(self):
        if self.image_layer is None or self.plane is None or not self.session.has_model:
            return None
        return self.session.key_for(self.image_layer, self.plane)

    def _ensure_embedding(self) -> bool:
        """Make the shown slice's embedding current in the predictor if it is available
        (never encodes). Cheap when it already is current."""
        key = self._current_key()
        if key is None:
            return False
        if self._active is None or self._active[0] != key:
            embedding = self.session.cache.get(key)
            if embedding is None:
                return False
            self._active = (key, embedding)
        predictor = self.session.predictor
        embedding = self._active[1]
        if not predictor.is_image_set or predictor.get_embedding() is not embedding:
            predictor.set_embedding(embedding)
        return True

    @property
    def encoding(self) -> bool:
        """True while a background encoding runs."""
        return self._worker is not None

    @property
    def embedding_ready(self) -> bool:
        """True when the shown slice is encoded (prompts decode immediately)."""
        key = self._current_key()
        return key is not None and (
            (self._active is not None and self._active[0] == key) or key in self.session.cache
        )

    def request_encoding(self, wait: bool = False) -> bool:
        """Encode the shown slice unless cached.

        Args:
            wait: encode now in this thread (scripts, notebooks); else in a worker.
        Returns:
            True when the embedding is ready now (cached, or ``wait``), False when a
            worker was started (or queued) or nothing can be encoded yet.
        """
        key = self._current_key()
        if key is None:
            if not self.session.has_model:
                self._status("load a model first (Load model)")
            return False
        if self._ensure_embedding():
            return True
        if wait:
            if self._worker is not None and self._worker_key == key:
                self.wait_for_encoding()  # it is encoding this very slice
                if self._ensure_embedding():
                    self.update_preview()
                    return True
            embedding = self.session.embedding(self.image_layer, self.plane)
            self._active = (key, embedding)
            self._ensure_embedding()
            self.update_preview()
            self.changed.emit()
            return True
        if self._worker is not None:
            if self._worker_key != key:
                self._pending = True
            return False
        worker = self.session.encode_worker(self.image_layer, self.plane, start=False)
        worker.returned.connect(self._on_encoded)
        worker.errored.connect(self._on_encode_error)
        worker.finished.connect(self._on_encode_finished)
        self._worker, self._worker_key = worker, key
        self._failed_key = None
        self._status(f"encoding '{self.image_layer.name}' ({self.plane.describe()})…")
        worker.start()
        self.changed.emit()
        return False

    def _on_encoded(self, result) -> None:
        key, embedding = result
        if key != self._current_key():
            return  # the user moved on: cached for later, not applied here
        self._active = (key, embedding)
        self._ensure_embedding()
        self.update_preview()
        if self.prediction is None:
            self._status("slice encoded: click (points) or draw boxes to segment")

    def _on_encode_error(self, exc) -> None:
        self._failed_key = self._worker_key
        self._status(f"encoding failed: {exc}")

    def _on_encode_finished(self) -> None:
        self._worker = None
        pending, self._pending = self._pending, False
        key = self._current_key()
        if (pending or self.auto_encode) and key is not None and key != self._failed_key:
            if not self._ensure_embedding():
                self.request_encoding()
        self.changed.emit()

    def wait_for_encoding(self, timeout: float = 120.0) -> bool:
        """Process Qt events until no background encoding runs; False on timeout."""
        from qtpy.QtWidgets import QApplication

        if QApplication.instance() is None:  # no Qt: no worker can finish
            return self._worker is None
        deadline = time.monotonic() + timeout
        while self._worker is not None:
            if time.monotonic() > deadline:
                return False
            QApplication.processEvents()
            time.sleep(0.005)
        return True
