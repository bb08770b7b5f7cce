"""The "Volume" part of the Segment Anything widget: propagation and embedding stores.

* **Propagate through stack**: the previewed object (or the label being refined) on the
  shown slice of a 3D / (T, Y, X) image is carried to the neighbouring slices by
  :func:`napari_sam.engine.volume.propagate` in a worker (progress bar, Cancel), then
  written as ONE label id in one undo step (no-overwrite rule as for commits). Cancelling
  writes nothing.
* **Open embedding store…**: an :class:`~napari_sam.engine.store.EmbeddingStore` (a
  ``.zarr`` folder) for the image; the session then reads slice embeddings from it (a
  stored slice costs no encoder call) and stores the ones it encodes. The store's
  normalisation is part of it: while a store is attached, the layer is encoded with the
  store's contrast limits (the panel says so), so a store made by ``napari-sam embed``
  opens as it is. A store made for other data or another model is never cleared
  silently: the panel asks (recompute / open read-only / cancel). **Precompute stack**
  encodes every missing slice, nearest to the shown slice first.

Scripting (through the widget)::

    widget.propagate(wait=True)                 # -> PropagationResult | None
    widget.open_store("cells.sam.zarr", wait=True)   # on_mismatch="error" | "recompute" | "read_only"
    widget.precompute_store(wait=True)          # -> PrecomputeResult
"""

from __future__ import annotations

from qtpy.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
)

from ..engine.volume import run_generator
from .geometry import base_data
from .jobs import JobRunner
from .labels_io import LabelsWriteError, write_objects
from .session import SliceEmbeddings

MISMATCH_CHOICES = ("recompute", "read_only", "cancel")


def ask_on_mismatch(parent, error) -> str:
    """Ask what to do with a store made for other data/model (a ``StoreMismatchError``):
    one of MISMATCH_CHOICES. "Open read-only" is offered only where the stored features
    can serve this model."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Embedding store does not match")
    box.setText(f"The store {error.path} does not match this image and model: {error.details} differs.")
    box.setInformativeText("Recompute clears the stored embeddings (only files napari-sam wrote) "
                           "and encodes the slices again. Read-only uses the store as it is and "
                           "never writes to it. Cancel leaves everything as it is.")
    buttons = {box.addButton("Recompute", QMessageBox.ButtonRole.DestructiveRole): "recompute"}
    if error.usable_read_only:
        buttons[box.addButton("Open read-only", QMessageBox.ButtonRole.AcceptRole)] = "read_only"
    buttons[box.addButton(QMessageBox.StandardButton.Cancel)] = "cancel"
    box.exec()
    return buttons.get(box.clickedButton(), "cancel")


class VolumePanel(QGroupBox):
    """Propagation + embedding store controls, for the viewer's ``segmenter`` (the
    :class:`~napari_sam._napari.segmenter.InteractiveSegmenter`: its image, plane,
    preview, target labels and status line) and ``session``. One job runs at a time."""

    def __init__(self, segmenter, session) -> None:
        super().__init__("Volume (3D / time)")
        self.segmenter, self.session, self.viewer = segmenter, session, segmenter.viewer
        self._center = 0
        self.ask_on_mismatch = lambda error: ask_on_mismatch(self, error)  # scripts may replace it
        self._build_ui()
        self.runner = JobRunner(segmenter.report, self._progress)
        self.runner.busy_changed.connect(lambda _busy: self._update_ui())
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
        self._propagate.setToolTip("carry the previewed object to the neighbouring slices and write it as one label")
        self._propagate.clicked.connect(lambda: self.propagate(wait=False))
        self._cancel_button = QPushButton("Cancel")
        self._cancel_button.setToolTip("stop the running job; no label changes")
        self._cancel_button.clicked.connect(self.cancel)
        self._open = QPushButton("Open embedding store…")
        self._open.setToolTip("a .zarr folder holding this stack's embeddings (e.g. from napari-sam embed)")
        self._open.clicked.connect(self._browse_store)
        self._precompute = QPushButton("Precompute stack")
        self._precompute.setToolTip("encode every missing slice into the store, nearest to the shown one first")
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
        return self.runner.running

    def _report(self, message: str) -> None:
        self.segmenter.report(message)

    def _store(self):
        source = self.segmenter.source
        return None if source is None else self.session.store_for(source)

    def _update_ui(self) -> None:
        busy = self.running
        self._propagate.setEnabled(not busy and self.segmenter.prediction is not None)
        self._open.setEnabled(not busy and self.segmenter.image_layer is not None)
        store = self._store()
        self._precompute.setEnabled(not busy and store is not None and not getattr(store, "read_only", False))
        self._cancel_button.setEnabled(busy)
        self._ready.setText("no embedding store" if store is None else self.describe_store(store))

    @staticmethod
    def describe_store(store) -> str:
        limits = store.contrast_limits
        norm = ("normalisation: the store's (uint8 as is / per-slice percentiles)" if limits is None
                else f"normalisation: the store's contrast limits {limits[0]:.4g}–{limits[1]:.4g}")
        mode = " (read-only)" if getattr(store, "read_only", False) else ""
        if getattr(store, "grid", None) is not None:
            rows, cols = store.grid.grid_shape
            what = f"tiles ready ({rows} x {cols} per slice)"
        else:
            what = "slices ready"
        return f"{store.path.name}{mode}: {int(store.ready.sum())}/{store.ready.size} {what}; {norm}"

    def cancel(self) -> None:
        """Stop the running propagation / precomputation (nothing half-written)."""
        self.runner.cancel()

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until no job runs; False on timeout."""
        return self.runner.wait(timeout)

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
        it with one label id (when refining a label: its own id, and its old pixels on the
        slices within reach are replaced).

        ``stop_range``: (first, last) slices, default from the spinboxes. ``wait=True``
        runs here and returns the :class:`PropagationResult` (None: nothing done);
        otherwise returns the worker (None if it could not start)."""
        from ..engine.volume import propagate

        seg = self.segmenter
        if self.running:
            self._report("a volume job is already running")
            return None
        if seg.image_layer is None or seg.plane is None or not self.session.has_model:
            self._report("choose an image and load a model first")
            return None
        masks = None if seg.prediction is None else seg.prediction.masks(seg.rank)
        masks = None if masks is None else masks[masks.reshape(len(masks), -1).any(axis=1)]
        if masks is None or len(masks) != 1:
            self._report("propagation needs exactly one previewed object on this slice "
                         f"(got {0 if masks is None else len(masks)})")
            return None
        try:
            embeddings = SliceEmbeddings(self.session, seg.image_layer, seg.plane)
        except ValueError as exc:
            self._report(f"cannot propagate: {exc}")
            return None
        start = seg.plane.index[embeddings.axis]
        rng = stop_range if stop_range is not None else self.stop_range(len(embeddings))
        if rng is not None and not rng[0] <= start <= rng[1]:
            self._report(f"the shown slice {start} is outside the range {rng[0]}–{rng[1]}")
            return None
        # everything the write needs, captured now on the GUI thread
        job = {"embeddings": embeddings, "image": seg.image_layer, "plane": seg.plane, "range": rng,
               "refine_id": seg.refine_id, "world_point": tuple(self.viewer.dims.point),
               "overwrite": seg.overwrite, "model": self.session.model, "labels": seg.labels_layer,
               "key": embeddings.key(start)}
        model = self.session.model
        self._report(f"propagating from slice {start}…")
        if wait:
            try:
                result = run_generator(propagate(model, embeddings, start, masks[0], stop_range=rng))
                return self._on_propagated(job, result)
            except (ValueError, LabelsWriteError) as exc:
                self._report(f"cannot propagate: {exc}")
                return None
        return self.runner.start(
            lambda cancel: propagate(model, embeddings, start, masks[0], stop_range=rng, cancel=cancel),
            desc=f"SAM: propagating '{seg.image_layer.name}'", total=len(embeddings),
            on_yield=self._on_step, on_done=lambda result: self._on_propagated(job, result),
            on_cancel=lambda: self._report("propagation cancelled: no label changed"),
            is_current=lambda: self._still_current(job))

    def _still_current(self, job) -> bool:
        """The image (and its data), the model and the chosen labels layer are as they were
        when the job started."""
        layers = self.viewer.layers
        return (job["image"] in layers and self.session.model is job["model"]
                and (job["labels"] is None or job["labels"] in layers)
                and self.session.key_for(job["image"], job["plane"]).source == job["key"].source)

    def _on_step(self, progress) -> None:
        self.runner.step(self._progress.value() + 1)
        self._report(f"propagating: slice {progress.index} ({progress.area} px, IoU {progress.iou_prev:.2f})")

    def _on_propagated(self, job, result):
        seg = self.segmenter
        if result is None:
            self._report("propagation cancelled: no label changed")
            return None
        embeddings, refine_id = job["embeddings"], job["refine_id"]
        planes = [embeddings.plane(i) for i in range(result.first, result.last + 1)]
        labels = job["labels"] if job["labels"] is not None else seg.target_labels()
        written = write_objects(
            labels, job["image"], planes, result.masks.astype("int32"), world_point=job["world_point"],
            overwrite=job["overwrite"], fixed_ids={1: refine_id} if refine_id is not None else None,
            replace_id=refine_id)  # refining: the old object goes on the slices reached
        seg.remember(written)
        if seg.plane == job["plane"]:
            seg.clear(status=False)
        if not written.label_ids:
            self._report("propagation done, but the object lies entirely on existing labels: nothing written")
            return result
        stops = ", ".join(f"{'up' if s.direction > 0 else 'down'}: {s.reason}"
                          + (f" at {s.index}" if s.index is not None else "")
                          + (f" (IoU {s.iou_prev:.2f})" if s.iou_prev is not None else "") for s in result.stops)
        kept = f"; {written.skipped[0]} px kept from existing labels" if written.skipped[0] else ""
        self._report(f"label {written.label_ids[0]}: slices {result.first}–{result.last} "
                     f"({len(planes)} slices); stops: {stops}{kept}")
        self._update_ui()
        return result

    # ------------------------------------------------------------------ embedding store
    def _browse_store(self) -> None:
        layer = self.segmenter.image_layer
        name = f"{layer.name}.sam.zarr" if layer is not None else "stack.sam.zarr"
        path, _ = QFileDialog.getSaveFileName(self, "Embedding store (a .zarr folder)", name,
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            self.open_store(path, wait=False)

    def open_store(self, path, wait: bool = False, on_mismatch: str = "ask"):
        """Open (or create) the embedding store at ``path`` for the current image (3D, one
        stack axis; or a 2D image, stored as a stack of one slice) — of the level being
        segmented for a multiscale image. A tiled plane gets a tiled store (the session's
        tiling: the store then serves tiles). An existing store keeps its normalisation,
        which the layer then uses.

        ``on_mismatch`` when the store was made for other data or another model: "ask"
        (a dialog: recompute / open read-only / cancel; "error" when ``wait``), "error"
        (refuse, nothing changes), "recompute" (clear what the store wrote, recompute) or
        "read_only" (use it as it is, never write). ``wait=True`` returns the store
        (None when refused); else the worker."""
        from ..engine.stack import single_image_stack
        from ..engine.store import EmbeddingStore, StoreMismatchError

        layer, plane = self.segmenter.image_layer, self.segmenter.plane
        if layer is None or plane is None or not self.session.has_model:
            self._report("choose an image and load a model first")
            return None
        source = self.segmenter.source
        hidden = [a for a in range(plane.ndim) if a not in plane.axes_rc]
        if getattr(layer, "rgb", False) or len(hidden) > 1 or (not hidden and plane.axes_rc != (0, 1)):
            self._report(f"an embedding store needs a 2D or 3D grayscale image, got shape {base_data(source).shape}")
            return None
        mode = "error" if on_mismatch == "ask" else on_mismatch
        data, model = base_data(source), self.session.model
        data, axis = (data, hidden[0]) if hidden else (single_image_stack(data), 0)
        tiling = self.session.grid_for(source, plane) or "off"

        def open_it():
            try:
                return EmbeddingStore.open(path, data, model, axis=axis, contrast_limits="stored",
                                           on_mismatch=mode, tiling=tiling)
            except StoreMismatchError as exc:
                return exc

        def done(store):
            if isinstance(store, StoreMismatchError):
                choice = self.ask_on_mismatch(store) if on_mismatch == "ask" else "cancel"
                if choice in ("recompute", "read_only"):
                    return self.open_store(path, wait=wait, on_mismatch=choice)
                self._report(f"store not opened, nothing changed: {store.path} does not match ({store.details})")
                return None
            if layer not in self.viewer.layers or self.session.model is not model:
                self._report("the image or model changed meanwhile: store not attached")
                return None
            self.session.attach_store(source, store)
            self._report(f"{store.status.message} — {self.describe_store(store)}")
            self._update_ui()
            return store

        if wait:
            try:
                return done(open_it())
            except Exception as exc:  # noqa: BLE001 - the user gets the reason, never a traceback
                self._report(f"could not open the store: {exc}")
                return None
        from .jobs import as_generator

        self._report(f"opening embedding store {path}…")
        return self.runner.start(as_generator(open_it), desc="SAM: opening the embedding store", on_done=done)

    def precompute(self, wait: bool = False):
        """Encode every missing slice into the store, nearest to the shown slice first.
        ``wait=True`` returns the :class:`PrecomputeResult`; else the worker."""
        store = self._store()
        if store is None or self.running:
            self._report("open an embedding store first" if store is None else "a volume job is already running")
            return None
        if getattr(store, "read_only", False):
            self._report("the store is open read-only: reopen it to recompute")
            return None
        self._center = self._current_index(store)
        if wait:
            return self._on_precomputed(run_generator(store.precompute(center=lambda: self._center)))
        worker = self.runner.start(
            lambda cancel: store.precompute(center=lambda: self._center, cancel=cancel),
            desc="SAM: precomputing embeddings", total=store.ready.size, on_yield=self._on_stored,
            on_done=self._on_precomputed,
            on_cancel=lambda: self._report(f"precompute cancelled: {self.describe_store(store)}"))
        self.runner.step(int(store.ready.sum()))
        return worker

    def _current_index(self, store) -> int:
        plane = self.segmenter.plane
        return self._center if plane is None or plane.ndim != 3 else int(plane.index[store.view.axis])

    def _on_stored(self, progress) -> None:
        store = self._store()
        if store is not None:
            self._center = self._current_index(store)  # follow the slider
        self.runner.step(progress.n_ready)
        what = "tiles" if getattr(progress, "n_tiles", 1) > 1 else "slices"
        self._ready.setText(f"{progress.n_ready}/{progress.n_slices} {what} ready")

    def _on_precomputed(self, result):
        what = "cancelled" if result.cancelled else "done"
        store = self._store()
        unit = "tile" if store is not None and getattr(store, "grid", None) is not None else "slice"
        self._report(f"precompute {what}: {result.n_computed} {unit}(s) encoded, "
                     f"{result.n_ready}/{result.n_slices} {unit}s ready ({result.seconds:.1f} s)")
        self._update_ui()
        return result
