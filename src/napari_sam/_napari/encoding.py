"""Background encoding of the shown slice: :class:`SliceEncoder`.

One encoding at a time (through a :class:`~napari_sam._napari.jobs.JobRunner`). Requests
made while it runs are coalesced: when it finishes, the slice shown *then* is encoded
(scrolling through 50 slices costs 2 encodings, not 50). A finished embedding always goes
to the cache, but reaches the predictor only if its key (layer, data version, slice, model,
normalisation) is still the one on screen — a stale result is never applied to the wrong
slice.
"""

from __future__ import annotations

from collections.abc import Callable

from .jobs import JobRunner


class SliceEncoder:
    """Keeps the predictor of ``session`` on the embedding of the shown slice.

    Args:
        session: the viewer's :class:`~napari_sam._napari.session.SamSession`.
        shown: ``shown() -> (image_layer, plane) | None``, what the viewer shows now.
        report: ``report(message)`` for the user.
        on_ready: called (GUI thread) when the shown slice's embedding became current.
        auto_encode: ``auto_encode()`` tells whether a finished job may start the next.
    """

    def __init__(self, session, shown: Callable, report: Callable[[str], None],
                 on_ready: Callable[[], None], auto_encode: Callable[[], bool]) -> None:
        self.session, self._shown, self._report = session, shown, report
        self._on_ready, self._auto_encode = on_ready, auto_encode
        self.runner = JobRunner(report)
        self.runner.busy_changed.connect(self._on_busy_changed)
        self._active = None  # (EmbeddingKey, ImageEmbedding) of the shown slice
        self._job_key = None
        self._pending = False
        self.failed_key = None

    def reset(self) -> None:
        """Forget the active embedding (model or image changed)."""
        self._active, self.failed_key = None, None

    def current_key(self):
        shown = self._shown()
        if shown is None or not self.session.has_model:
            return None
        return self.session.key_for(*shown)

    def activate(self, prepared=None) -> bool:
        """Make the shown slice's embedding current in the predictor if it is available
        (never encodes). Cheap when it already is current.

        Args:
            prepared: the worker's :class:`~napari_sam.engine.predictor.PreparedEmbedding`
                of the embedding, if any (used only if it is the one made current).
        """
        key = self.current_key()
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
            predictor.set_embedding(embedding, prepared)
        return True

    @property
    def encoding(self) -> bool:
        """True while a background encoding runs."""
        return self.runner.running

    @property
    def ready(self) -> bool:
        """True when the shown slice is encoded (prompts decode immediately)."""
        key = self.current_key()
        return key is not None and (
            (self._active is not None and self._active[0] == key) or key in self.session.cache)

    def request(self, wait: bool = False) -> bool:
        """Encode the shown slice unless cached.

        Args:
            wait: encode now in this thread (scripts, notebooks); else in a worker.
        Returns:
            True when the embedding is ready now (cached, or ``wait``), False when a
            worker was started (or queued) or nothing can be encoded yet.
        """
        key = self.current_key()
        if key is None:
            if not self.session.has_model:
                self._report("load a model first (Load model)")
            return False
        if self.activate():
            return True
        if wait:
            if self.runner.running and self._job_key == key:
                self.runner.wait()  # it is encoding this very slice
                if self.activate():
                    return True
            layer, plane = self._shown()
            self._active = (key, self.session.embedding(layer, plane))
            self.activate()
            self._prepare_decoder()
            return True
        if self.runner.running:
            self._pending = self._pending or self._job_key != key
            return False
        layer, plane = self._shown()
        key, job = self.session.encode_job(layer, plane)
        self._job_key, self.failed_key = key, None
        self._report(f"encoding '{layer.name}' ({plane.describe()})…")
        self.runner.start(_encode_then_prepare(job, self.session.predictor),
                          desc=f"SAM: encoding '{layer.name}' ({plane.describe()})",
                          on_done=self._on_encoded, on_error=self._on_error, on_cancel=self._on_cancelled)
        return False

    def _on_encoded(self, result) -> None:
        key, embedding, prepared = result
        if key != self.current_key():
            return  # the user moved on: cached for later, not applied here
        self._active = (key, embedding)
        if self.activate(prepared):
            self._on_ready()

    def _prepare_decoder(self) -> None:
        """Do the predictor's per-image decoder work (the image-side projections every
        prompt reuses) now, so the first click does not wait for it: for ``wait=True``
        encodes (a background encode does it in its worker, :func:`_encode_then_prepare`).
        Slices activated again from the cache (scrolling) prepare lazily, on their first
        prompt."""
        self.session.predictor.prepare_decoder()

    def _on_error(self, exc) -> None:
        self.failed_key = self._job_key

    def _on_cancelled(self) -> None:
        """Stopped by the user (within an encoder block). The job's end never restarts
        the stopped slice and drops a request queued meanwhile; with auto-encode on, the
        slice shown at that moment, if another one, is still encoded, as is any slice the
        user moves to later (the stopped one included). A prompt or an explicit request
        on the stopped slice encodes it again."""
        self.failed_key, self._pending = self._job_key, False
        self._report("encoding stopped: nothing cached; a prompt on this slice starts it again")

    def _on_busy_changed(self, busy: bool) -> None:
        if busy:
            return
        pending, self._pending = self._pending, False
        key = self.current_key()
        if key is None or key in (self.failed_key, self._job_key):
            # nothing shown, the slice that failed or was stopped, or the slice the ended
            # job encoded: its on_done (next) applies it with the worker's decoder work
            return
        if (pending or self._auto_encode()) and not self.activate():
            self.request()

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until no background encoding runs; False on timeout."""
        from qtpy.QtWidgets import QApplication

        if QApplication.instance() is None:  # no Qt: no worker can finish
            return not self.runner.running
        return self.runner.wait(timeout)

    def shutdown(self) -> None:
        self.runner.shutdown()


def _encode_then_prepare(job, predictor):
    """The encode ``job`` (a generator returning ``(key, embedding)``), then, in the same
    worker, ``predictor``'s per-image work for the embedding (a plain copy of its features,
    the decoder's image-side projections: tens of ms on a CPU), which the GUI thread would
    otherwise do when the result is applied. Returns ``(key, embedding, prepared)``;
    ``prepared`` is None when the model changed meanwhile (the result is not applied)."""
    key, embedding = yield from job
    if embedding.model_signature != predictor.model_signature:
        return key, embedding, None
    return key, embedding, predictor.prepare_embedding(embedding)
