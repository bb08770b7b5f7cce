"""The "Volume" part of the Segment Anything widget: propagation and embedding stores.

* **Propagate through stack**: the previewed object (or the label being refined) on the
  shown slice of a 3D / (T, Y, X) image is carried to the neighbouring slices by
  :func:`napari_sam.engine.volume.propagate` in a worker (progress bar, Cancel), then
  written as ONE label id in one undo step (no-overwrite rule as for commits). Cancelling
  writes nothing.
* **Open embedding store…**: an :class:`~napari_sam.engine.store.EmbeddingStore` (a
  ``.zarr`` folder) for the image; the session then reads slice embeddings from it (a
  stored slice costs no encoder call) and stores the ones it encodes. **Precompute stack**
  encodes every missing slice, nearest to the shown slice first.

Scripting (through the widget)::

    widget.propagate(wait=True)                 # -> PropagationResult | None
    widget.open_store("cells.sam.zarr", wait=True)
    widget.precompute_store(wait=True)          # -> PrecomputeResult
"""

from __future__ import annotations

import threading

from qtpy.QtWidgets import (QFileDialog, QGridLayout, QGroupBox, QLabel, QProgressBar,
                            QPushButton, QSpinBox)

from ..engine.volume import run_generator
from .geometry import base_data
from .labels_io import commit_stack, ensure_labels_layer
from .session import SliceEmbeddings, normalisation


def _drive(gen):
    """Generator function wrapping a progress generator (for napari's ``create_worker``)."""
    return (yield from gen)


class VolumePanel(QGroupBox):
    """Propagation + embedding store controls for ``widget`` (a SegmentAnythingWidget:
    its ``segmenter``, ``session`` and ``viewer`` are used). One job runs at a time."""

    def __init__(self, widget) -> None:
        super().__init__("Volume (3D / time)")
        self.segmenter, self.session, self.viewer = widget.segmenter, widget.session, widget.viewer
        self.worker = None
        self._cancel = threading.Event()
        self._center = 0
        self._build_ui()
        self.segmenter.changed.connect(self._update_ui)
        self._update_ui()

    def _build_ui(self) -> None:
        grid = QGridLayout(self)
        self._from, self._to = QSpinBox(), QSpinBox()
        for spin, text in ((self._from, "first"), (self._to, "last")):
            spin.setRange(-1, 1_000_000)
            spin.setValue(-1)
            spin.setSpecialValueText(text)
            spin.setToolTip("propagation stays within these slices (inclusive)")
        self._propagate = QPushButton("Propagate through stack")
        self._propagate.clicked.connect(lambda: self.propagate(wait=False))
        self._cancel_button = QPushButton("Cancel")
        self._cancel_button.clicked.connect(self.cancel)
        self._open = QPushButton("Open embedding store…")
        self._open.clicked.connect(self._browse_store)
        self._precompute = QPushButton("Precompute stack")
        self._precompute.clicked.connect(lambda: self.precompute(wait=False))
        self._progress = QProgressBar()
        self._progress.setTextVisible(True)
        self._ready = QLabel("no embedding store")
        self._ready.setWordWrap(True)
        grid.addWidget(QLabel("from"), 0, 0)
        grid.addWidget(self._from, 0, 1)
        grid.addWidget(QLabel("to"), 0, 2)
        grid.addWidget(self._to, 0, 3)
        grid.addWidget(self._propagate, 1, 0, 1, 4)
        grid.addWidget(self._open, 2, 0, 1, 2)
        grid.addWidget(self._precompute, 2, 2, 1, 2)
        grid.addWidget(self._progress, 3, 0, 1, 3)
        grid.addWidget(self._cancel_button, 3, 3)
        grid.addWidget(self._ready, 4, 0, 1, 4)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _status(self, message: str) -> None:
        self.segmenter._status(message)

    def _store(self):
        layer = self.segmenter.image_layer
        return None if layer is None else self.session.store_for(layer)

    def _update_ui(self) -> None:
        busy = self.running
        self._propagate.setEnabled(not busy and self.segmenter.prediction is not None)
        self._open.setEnabled(not busy and self.segmenter.image_layer is not None)
        self._precompute.setEnabled(not busy and self._store() is not None)
        self._cancel_button.setEnabled(busy)
        store = self._store()
        if store is not None:
            self._ready.setText(f"{store.status.message}\n{int(store.ready.sum())}/{len(store)} slices ready")
        else:
            self._ready.setText("no embedding store")

    def _start(self, gen, on_done, desc: str, total: int, on_yield):
        """Run progress generator ``gen`` in a worker; ``on_done(result)`` on the GUI thread."""
        from napari.qt.threading import create_worker

        self._cancel.clear()
        worker = create_worker(_drive, gen, _start_thread=False, _progress={"total": total, "desc": desc})
        worker.yielded.connect(on_yield)
        worker.returned.connect(on_done)
        worker.errored.connect(lambda exc: self._status(f"{desc} failed: {exc}"))
        worker.finished.connect(self._on_finished)
        self._progress.setRange(0, max(total, 1))
        self._progress.setValue(0)
        self.worker = worker
        worker.start()
        self._update_ui()
        return worker

    def _on_finished(self) -> None:
        self.worker = None
        self._update_ui()

    def cancel(self) -> None:
        """Stop the running propagation / precomputation (nothing half-written)."""
        self._cancel.set()

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until no job runs; False on timeout."""
        import time

        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + timeout
        while self.worker is not None:
            if time.monotonic() > deadline:
                return False
            QApplication.processEvents()
            time.sleep(0.005)
        return True

    # ------------------------------------------------------------------ propagation
    def stop_range(self, n: int) -> tuple[int, int] | None:
        lo, hi = self._from.value(), self._to.value()
        if lo < 0 and hi < 0:
            return None
        return (max(lo, 0), n - 1 if hi < 0 else hi)

    def set_stop_range(self, first: int | None, last: int | None) -> None:
        """Limit propagation to slices ``first…last`` (None: no limit on that side)."""
        self._from.setValue(-1 if first is None else int(first))
        self._to.setValue(-1 if last is None else int(last))

    def propagate(self, wait: bool = False, stop_range=None):
        """Propagate the previewed object of the shown slice through the stack and commit
        it with one label id (the refined label's own id when refining).

        ``stop_range``: (first, last) slices, default from the spinboxes. ``wait=True``
        runs here and returns the :class:`PropagationResult` (None: nothing done);
        otherwise returns the worker (None if it could not start)."""
        from ..engine.volume import propagate

        seg = self.segmenter
        if self.running:
            self._status("a volume job is already running")
            return None
        if seg.image_layer is None or seg.plane is None or not self.session.has_model:
            self._status("choose an image and load a model first")
            return None
        masks = None if seg.prediction is None else seg.prediction.masks(seg.rank)
        masks = None if masks is None else masks[masks.reshape(len(masks), -1).any(axis=1)]
        if masks is None or len(masks) != 1:
            self._status("propagation needs exactly one previewed object on this slice "
                         f"(got {0 if masks is None else len(masks)})")
            return None
        try:
            embeddings = SliceEmbeddings(self.session, seg.image_layer, seg.plane)
        except ValueError as exc:
            self._status(f"cannot propagate: {exc}")
            return None
        start = seg.plane.index[embeddings.axis]
        rng = stop_range if stop_range is not None else self.stop_range(len(embeddings))
        job = (embeddings, seg.image_layer, seg.plane, seg.refine_id)
        if rng is not None and not rng[0] <= start <= rng[1]:
            self._status(f"the shown slice {start} is outside the range {rng[0]}–{rng[1]}")
            return None
        gen = propagate(self.session.model, embeddings, start, masks[0], stop_range=rng, cancel=self._cancel)
        self._status(f"propagating from slice {start}…")
        if wait:
            self._cancel.clear()
            try:
                result = run_generator(gen)
            except ValueError as exc:
                self._status(f"cannot propagate: {exc}")
                return None
            return self._on_propagated(job, result)
        return self._start(gen, lambda result: self._on_propagated(job, result),
                           f"SAM: propagating '{seg.image_layer.name}'", len(embeddings), self._on_step)

    def _on_step(self, progress) -> None:
        self._progress.setValue(self._progress.value() + 1)
        self._status(f"propagating: slice {progress.index} ({progress.area} px, IoU {progress.iou_prev:.2f})")

    def _on_propagated(self, job, result):
        embeddings, image, plane, refine_id = job
        seg = self.segmenter
        if result is None:
            self._status("propagation cancelled: no label changed")
            return None
        if image not in self.viewer.layers:
            self._status("the image layer was removed: nothing committed")
            return None
        if seg.labels_layer is None or seg.labels_layer not in self.viewer.layers:
            with seg._keep_active_layer():
                seg.labels_layer = ensure_labels_layer(self.viewer, image)
        planes = [embeddings.plane(i) for i in range(result.first, result.last + 1)]
        written = commit_stack(seg.labels_layer, image, planes, result.masks, refine_id, seg.overwrite)
        if seg.plane == plane:
            seg.clear(status=False)
        stops = ", ".join(f"{'up' if s.direction > 0 else 'down'}: {s.reason}"
                          + (f" at {s.index}" if s.index is not None else "")
                          + (f" (IoU {s.iou_prev:.2f})" if s.iou_prev is not None else "") for s in result.stops)
        kept = f"; {written.skipped[0]} px kept from existing labels" if written.skipped[0] else ""
        self._status(f"label {written.label_ids[0]}: slices {result.first}–{result.last} "
                     f"({len(planes)} slices); stops: {stops}{kept}")
        self._update_ui()
        return result

    # ------------------------------------------------------------------ embedding store
    def _browse_store(self) -> None:
        layer = self.segmenter.image_layer
        name = f"{layer.name}.sam.zarr" if layer is not None else "stack.sam.zarr"
        path, _ = QFileDialog.getSaveFileName(self, "Embedding store (a .zarr folder)", name,
                                              options=QFileDialog.DontConfirmOverwrite)
        if path:
            self.open_store(path, wait=False)

    def open_store(self, path, wait: bool = False):
        """Open (or create) the embedding store at ``path`` for the current image (3D,
        one stack axis, contrast as shown now). ``wait=True`` returns the store; else the
        worker."""
        from ..engine.store import EmbeddingStore

        layer, plane = self.segmenter.image_layer, self.segmenter.plane
        if layer is None or plane is None or not self.session.has_model:
            self._status("choose an image and load a model first")
            return None
        hidden = [a for a in range(plane.ndim) if a not in plane.axes_rc]
        if getattr(layer, "rgb", False) or len(hidden) != 1:
            self._status(f"an embedding store needs a 3D grayscale image, got shape {base_data(layer).shape}")
            return None
        norm = normalisation(layer)
        limits = None if norm == ("uint8",) else norm[1:]
        args = (path, base_data(layer), self.session.model)
        kwargs = {"axis": hidden[0], "contrast_limits": limits}

        def done(store):
            self.session.attach_store(layer, store)
            self._status(store.status.message)
            self._update_ui()
            return store

        if wait:
            return done(EmbeddingStore.open(*args, **kwargs))
        from napari.qt.threading import create_worker

        worker = create_worker(EmbeddingStore.open, *args, **kwargs, _start_thread=False,
                               _progress={"desc": "SAM: opening the embedding store"})
        worker.returned.connect(done)
        worker.errored.connect(lambda exc: self._status(f"could not open the store: {exc}"))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._status(f"opening embedding store {path}…")
        worker.start()
        self._update_ui()
        return worker

    def precompute(self, wait: bool = False):
        """Encode every missing slice into the store, nearest to the shown slice first.
        ``wait=True`` returns the :class:`PrecomputeResult`; else the worker."""
        store = self._store()
        if store is None or self.running:
            self._status("open an embedding store first" if store is None else "a volume job is already running")
            return None
        self._center = self._current_index(store)
        gen = store.precompute(center=lambda: self._center, cancel=self._cancel)
        if wait:
            self._cancel.clear()
            return self._on_precomputed(run_generator(gen))
        worker = self._start(gen, self._on_precomputed, "SAM: precomputing embeddings",
                             len(store), self._on_stored)
        self._progress.setValue(int(store.ready.sum()))
        return worker

    def _current_index(self, store) -> int:
        plane = self.segmenter.plane
        return self._center if plane is None or plane.ndim != 3 else int(plane.index[store.view.axis])

    def _on_stored(self, progress) -> None:
        store = self._store()
        if store is not None:
            self._center = self._current_index(store)  # follow the slider
        self._progress.setValue(progress.n_ready)
        self._ready.setText(f"{progress.n_ready}/{progress.n_slices} slices ready")

    def _on_precomputed(self, result):
        what = "cancelled" if result.cancelled else "done"
        self._status(f"precompute {what}: {result.n_computed} slice(s) encoded, "
                     f"{result.n_ready}/{result.n_slices} slices ready ({result.seconds:.1f} s)")
        self._update_ui()
        return result
