"""The "Segment Anything" dock widget: prompts in, live masks, objects into Labels.

Everything it does is also a method, for scripts and notebooks (no clicks needed)::

    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.load_model("vit_t")                    # or widget.set_model(build_sam(...))
    widget.set_image_layer(viewer.layers["cells"])
    widget.encode_current_slice(wait=True)        # blocking; the GUI uses a worker
    widget.add_point((120.0, 64.0))               # world (row, col) on the shown slice
    widget.add_box((10, 10), (60, 90))            # two opposite world corners
    result = widget.commit()                      # -> CommitResult(label_ids=[1, 2], ...)
    widget.undo_last_commit()                     # whatever layer is active

Keys (viewer-wide while the widget is docked): N toggles point polarity, K cycles the
candidate masks, Shift-Enter commits, Shift-X clears the slice's prompts, Shift-Z undoes
the widget's last commit. Closing the widget cancels its jobs and unbinds its keys; the
model stays in the viewer's session for the next widget.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .canvas_cursor import CanvasCursor
from .jobs import JobRunner
from .labels_io import CommitResult
from .lifetime import on_close
from .prompt_layers import preferred_image, refill_layer_combos
from .segmenter import InteractiveSegmenter
from .session import SamSession, real_viewer, session_for
from .tiling_panel import TilingPanel
from .ui import fit_narrow_docks, scrolled_body, with_tip
from .volume_panel import VolumePanel

NEW_LABELS = "new layer: SAM labels"


def fill_model_picker(combo: QComboBox) -> None:
    """The zoo's models grouped under one (unselectable) header per imaging domain; each
    entry's data is its name, its tooltip the one-line description."""
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QFont

    from ..model.zoo import models_by_domain

    for domain, models in models_by_domain():
        combo.addItem(domain.capitalize(), None)
        header = combo.model().item(combo.count() - 1)
        header.setEnabled(False)
        font = QFont(header.font())
        font.setBold(True)
        header.setFont(font)
        for m in models:
            combo.addItem(f"  {m.name}" + ("  · AIS" if m.has_decoder else ""), m.name)
            combo.setItemData(combo.count() - 1, m.description, Qt.ItemDataRole.ToolTipRole)
    combo.setCurrentIndex(combo.findData("vit_t"))


class SegmentAnythingWidget(QWidget):
    """Interactive Segment Anything for ``napari_viewer``.

    Args:
        napari_viewer: the viewer (napari passes it when docking).
        session: the :class:`SamSession` to use; default ``session_for(napari_viewer)``,
            shared with the other napari-sam widgets of the viewer.
    """

    KEYS = {"N": "toggle_polarity", "K": "next_candidate", "Shift-Enter": "commit", "Shift-X": "clear",
            "Shift-Z": "undo_last_commit"}

    def __init__(self, napari_viewer, session: SamSession | None = None) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari may hand us a proxy of it
        self.session = session if session is not None else session_for(self.viewer)
        self.segmenter = InteractiveSegmenter(self.viewer, self.session)
        self._build_ui()
        self.loader = JobRunner(self.segmenter.report)
        self.loader.busy_changed.connect(
            lambda busy: self._load_button.setText("Cancel loading" if busy else "Load model"))
        self.segmenter.changed.connect(self._update_ui)
        self.segmenter.encoder.runner.busy_changed.connect(lambda _busy: self._update_ui())
        self.session.embeddings_changed.connect(self._update_ui)
        self.segmenter.status.connect(self._on_status)
        self.session.model_changed.connect(self._on_model_changed)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh_layer_choices)
        panel = self.tiling

        def disarm():
            self._disarm_pick()
            panel.close_panel()

        self._cleanup = _Cleanup(self.segmenter, self.viewer, self._bind_keys(),
                                 self._refresh_layer_choices, self._on_model_changed,
                                 [self.loader, self.volume.runner], disarm, self._update_ui)
        on_close(self, self._cleanup)
        self._refresh_layer_choices()
        self._on_model_changed(self.session.model)

    # ------------------------------------------------------------------ UI
    def showEvent(self, event) -> None:
        """Once styled (fonts known), make the dock wide enough for every control."""
        super().showEvent(event)
        fit_narrow_docks(self)
        if self.segmenter.canvas_cursor is None:  # docked now: napari's window holds the canvas
            self.segmenter.canvas_cursor = CanvasCursor.find(self.window())

    def _build_ui(self) -> None:
        layout, footer = scrolled_body(self)
        model_box = QGroupBox("Model")
        form = QFormLayout(model_box)
        self._model_type = QComboBox()
        fill_model_picker(self._model_type)
        self._checkpoint = QLineEdit()
        self._checkpoint.setPlaceholderText("official weights (downloaded once)")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.addWidget(self._checkpoint)
        row.addWidget(browse)
        self._device = QComboBox()
        self._device.addItems(["auto", "cpu", "cuda", "mps"])
        self._load_button = QPushButton("Load model")
        self._load_button.clicked.connect(self._load_or_cancel)
        self._model_label = QLabel("no model loaded")
        with_tip(self._model_type, "which model, grouped by imaging domain (hover an entry for what it "
                                   "was trained on): vit_t models are fast on a CPU, vit_b/l/h larger and "
                                   "slower; 'AIS' models also segment everything in seconds (Segment "
                                   "Everything widget, mode AIS)")
        with_tip(self._checkpoint, "a local checkpoint file (.pth/.pt); empty: the official weights, "
                                   "downloaded once into the cache folder")
        with_tip(browse, "choose a checkpoint file")
        with_tip(self._device, "auto: CUDA, then Apple MPS, then the CPU")
        with_tip(self._load_button, "load the model (in the background); shared by every napari-sam "
                                    "widget of this viewer")
        form.addRow("Model", self._model_type)
        form.addRow("Checkpoint", row)
        form.addRow("Device", self._device)
        form.addRow(self._load_button, self._model_label)
        layout.addWidget(model_box)

        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        self._image_combo = QComboBox()
        self._image_combo.activated.connect(lambda _i: self.set_image_layer(self._image_combo.currentData()))
        self._labels_combo = QComboBox()
        self._labels_combo.activated.connect(lambda _i: self.set_labels_layer(self._labels_combo.currentData()))
        self._overwrite = QCheckBox("overwrite existing labels")
        self._overwrite.toggled.connect(lambda on: setattr(self.segmenter, "overwrite", bool(on)))
        self._cache = QSpinBox()
        self._cache.setRange(1, 1024)
        self._cache.setValue(self.session.cache_size)
        self._cache.setSuffix(" slices")
        self._cache.valueChanged.connect(lambda v: setattr(self.session, "cache_size", int(v)))
        with_tip(self._image_combo, "the image layer to segment (2D, 3D stacks, time series, RGB)")
        with_tip(self._labels_combo, "where commits go; any Labels layer, whatever its scale or size: "
                                     "objects land where napari shows them")
        with_tip(self._overwrite, "let new objects paint over existing labels (off: existing labels are kept)")
        with_tip(self._cache, "how many slice embeddings to keep in memory (about 4 MiB each): "
                              "going back to a kept slice needs no encoding")
        form.addRow("Image", self._image_combo)
        form.addRow("Labels", self._labels_combo)
        form.addRow("", self._overwrite)
        form.addRow("Embedding cache", self._cache)
        layout.addWidget(data_box)
        self.tiling = TilingPanel(self.session, on_stop=self.segmenter.cancel_encoding)
        layout.addWidget(self.tiling)

        prompt_box = QGroupBox("Prompts")
        grid = QVBoxLayout(prompt_box)
        self._polarity = QPushButton("Positive points (N)")
        self._polarity.setCheckable(True)
        self._polarity.setChecked(True)
        self._polarity.clicked.connect(lambda on: self.set_positive(bool(on)))
        self._candidate = QPushButton("Next candidate (K)")
        self._candidate.clicked.connect(self.next_candidate)
        self._commit = QPushButton("Commit (Shift-Enter)")
        self._commit.clicked.connect(self.commit)
        self._clear = QPushButton("Clear (Shift-X)")
        self._clear.clicked.connect(self.clear)
        self._refine = QPushButton("Refine a label: click it")
        self._refine.setCheckable(True)
        self._refine.toggled.connect(self._arm_pick)
        self._undo = QPushButton("Undo commit (Shift-Z)")
        self._undo.clicked.connect(self.undo_last_commit)
        with_tip(self._polarity, "new points mark the object (green) or the background (red)")
        with_tip(self._candidate, "a single point gives three candidate masks: show the next one")
        with_tip(self._commit, "write the previewed object(s) into the Labels layer (one undo step)")
        with_tip(self._clear, "remove this slice's points, boxes and preview")
        with_tip(self._refine, "then click an object of the Labels layer: new prompts correct it and "
                               "commit replaces it")
        with_tip(self._undo, "take back this widget's last commit or propagation, whatever layer is active")
        for a, b in ((self._polarity, self._candidate), (self._commit, self._clear), (self._refine, self._undo)):
            row = QHBoxLayout()
            row.addWidget(a)
            row.addWidget(b)
            grid.addLayout(row)
        self._prepare_box = QCheckBox("Prepare the mask under the resting cursor")
        self._prepare_box.setChecked(self.segmenter.decode_ahead)
        self._prepare_box.toggled.connect(lambda on: setattr(self.segmenter, "decode_ahead", bool(on)))
        with_tip(self._prepare_box, "while the cursor rests on the image (2D view, untiled), work out in the "
                                    "background the mask a click at that very spot would give, so it shows as "
                                    "you click; a click elsewhere stops that work and computes its own mask "
                                    "(off: the mask is worked out on the click only)")
        grid.addWidget(self._prepare_box)
        layout.addWidget(prompt_box)
        self.volume = VolumePanel(self.segmenter, self.session)  # propagation, embedding store
        layout.addWidget(self.volume)
        help_text = QLabel("Click points on the 'SAM points' layer, draw rectangles on 'SAM boxes'. "
                           "Several boxes give several objects. 3D stacks: prompt slice by slice in 2D view.")
        help_text.setWordWrap(True)
        help_text.setStyleSheet("color: gray;")
        layout.addWidget(help_text)
        layout.addStretch(1)
        self._status = QLabel("choose an image and load a model")
        self._status.setWordWrap(True)
        footer.addWidget(self._status)
        fit_narrow_docks(self)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt);;All files (*)")
        if path:
            self._checkpoint.setText(path)

    def _refresh_layer_choices(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._refresh_layer_choices)  # renames show up
        refill_layer_combos(self.viewer, self._image_combo, self._labels_combo, NEW_LABELS)
        if self.segmenter.image_layer is None and self._image_combo.count():
            self.set_image_layer(preferred_image(self.viewer))
        self._sync_combos()

    def _sync_combos(self) -> None:
        for combo, layer in ((self._image_combo, self.segmenter.image_layer),
                             (self._labels_combo, self.segmenter.labels_layer)):
            index = combo.findData(layer) if layer is not None else (0 if combo is self._labels_combo else -1)
            if index >= 0:
                combo.setCurrentIndex(index)

    def _on_status(self, message: str) -> None:
        self._status.setText(message)

    def _update_ui(self) -> None:
        seg = self.segmenter
        self._polarity.setChecked(seg.positive)
        self._polarity.setText("Positive points (N)" if seg.positive else "Negative points (N)")
        pred = seg.prediction
        self._candidate.setEnabled(pred is not None and pred.num_candidates > 1)
        self._commit.setEnabled(pred is not None)
        if self.tiling._layer is not seg.image_layer:
            self.tiling.set_layer(seg.image_layer)
        self.tiling.set_status(seg.tiling_status())
        self.tiling.stop_button.setEnabled(seg.encoding)
        self._sync_combos()

    def _on_model_changed(self, model=None) -> None:
        if model is None:
            self._model_label.setText("no model loaded")
        else:
            self._model_label.setText(f"{getattr(model, 'model_type', type(model).__name__)} on {getattr(model, 'device', '?')}")

    def _bind_keys(self) -> dict:
        previous = {}
        for key, method in self.KEYS.items():
            action = getattr(self, method)
            previous[key] = self.viewer.bind_key(key, lambda _viewer, a=action: a(), overwrite=True)
        return previous

    def _arm_pick(self, armed: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if armed and self._pick not in callbacks:
            if self.segmenter.points_layer is not None:
                self._points_mode = self.segmenter.points_layer.mode
                self.segmenter.points_layer.mode = "pan_zoom"
            callbacks.append(self._pick)
            self._status.setText("click an object of the labels layer to refine it")
        elif not armed and self._pick in callbacks:
            callbacks.remove(self._pick)
            if self.segmenter.points_layer is not None:
                self.segmenter.points_layer.mode = getattr(self, "_points_mode", "add")

    def _disarm_pick(self) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if self._pick in callbacks:
            callbacks.remove(self._pick)

    def _pick(self, viewer, event) -> None:
        self.pick_label_at(event.position)
        self._refine.setChecked(False)

    # ------------------------------------------------------------------ scripting API
    def set_model(self, model) -> None:
        """Use an already built model (``build_sam(...)``, or any object with its engine
        interface). Shared with the viewer's other napari-sam widgets."""
        self.session.set_model(model)

    def load_model(self, model_type: str | None = None, checkpoint=None, device=None,
                   precision: str = "auto", wait: bool = True):
        """Build and use a model: ``model_type`` "vit_t" | "vit_b" | "vit_l" | "vit_h",
        ``checkpoint`` a local file (None = official weights, downloaded once), ``device``
        "auto" | "cpu" | "cuda" | "mps". Unset arguments come from the widget's fields.
        ``wait=False`` loads in a worker (the button does) and returns the worker; a
        failure (offline, bad file) reaches the status line and a notification."""
        from .. import engine
        from ..engine.weights import CHECKPOINTS, decoder_name, model_files_job

        model_type = model_type or self._model_type.currentData()
        checkpoint = checkpoint or (self._checkpoint.text().strip() or None)
        device = device or self._device.currentText()
        if wait:
            return self.session.load_model(model_type, checkpoint, device, precision)
        build = engine.build_sam  # looked up now: tests replace it

        def job(cancel):
            path, decoder = checkpoint, None
            if path is None and model_type in CHECKPOINTS:  # published weights: fetched once
                paths = yield from model_files_job(model_type, cancel)  # + its AIS decoder
                if paths is None:
                    return None  # cancelled
                path, decoder = paths
            return build(model_type, checkpoint=path, device=device, precision=precision,
                         decoder_checkpoint=decoder)

        def done(model):
            if model is not None:
                self.session.set_model(model)
                missing = (decoder_name(model_type) is not None and checkpoint is None
                           and getattr(model, "instance_decoder", None) is None)
                self.segmenter.report(f"model {model_type} loaded" + (
                    " without its AIS decoder (download failed; Segment Everything: AMG only)"
                    if missing else ""))

        def cancelled():
            self.segmenter.report("loading cancelled: no model changed (a partial download is removed)")

        self.segmenter.report(f"loading {model_type}…")
        return self.loader.start(job, desc=f"SAM: loading {model_type}", on_yield=self._on_download,
                                 on_done=done, on_cancel=cancelled, activity=True)

    def _on_download(self, progress) -> None:
        """A :class:`~napari_sam.engine.weights.DownloadProgress`: size and speed in the
        activity dock (KiB) and on the status line.

        The status line first: napari's activity bar processes Qt events inside its update,
        so the next steps and the job's end ("loading cancelled") can run within it; a
        status written after it would overwrite theirs with an older step."""
        self.segmenter.report(f"downloading {progress.describe()} (Cancel loading stops it)")
        self.loader.activity(progress.done_bytes >> 10, progress.total_bytes >> 10,  # 0: unknown
                             f"SAM: downloading {progress.describe()}")

    def _load_or_cancel(self) -> None:
        if self.loader.running:
            self.loader.cancel()
        else:
            self.load_model(wait=False)

    def set_image_layer(self, layer) -> None:
        """Segment this Image layer (2D, 3D, time series, RGB; any dtype)."""
        self.segmenter.set_image_layer(layer)
        self._sync_combos()

    def set_labels_layer(self, layer) -> None:
        """Commit into this Labels layer (None: a new "SAM labels" layer on first commit)."""
        self.segmenter.labels_layer = layer
        self._sync_combos()

    def set_tiling(self, mode: str = "auto", tile_shape=None, halo=None) -> None:
        """Tile large planes: ``mode`` "auto" | "on" | "off", ``tile_shape`` (pixels; None:
        the model's input size), ``halo`` (None: an eighth of the tile). Shared with the
        viewer's other napari-sam widgets."""
        self.session.set_tiling(mode, tile_shape, halo)

    def set_level(self, level: int | None) -> None:
        """Segment level ``level`` of the multiscale image (None: the default)."""
        self.session.set_level(self.segmenter.image_layer, level)

    def set_overwrite(self, overwrite: bool) -> None:
        """Let commits paint over existing non-zero labels (off by default)."""
        self._overwrite.setChecked(bool(overwrite))
        self.segmenter.overwrite = bool(overwrite)

    def encode_current_slice(self, wait: bool = False) -> bool:
        """Encode the shown slice (no-op when cached). ``wait=True`` blocks until done;
        otherwise a background worker runs. Returns True when the embedding is ready."""
        return self.segmenter.request_encoding(wait=wait)

    def wait_for_encoding(self, timeout: float = 120.0) -> bool:
        """Process Qt events until the background encoding finished (False on timeout)."""
        return self.segmenter.wait_for_encoding(timeout)

    def add_point(self, position_world, positive: bool | None = None) -> bool:
        """Add a prompt point at ``position_world`` (world coordinates; (row, col) means the
        shown slice). ``positive`` None uses the current polarity. A point outside the
        image is not added (status message). Returns True when added."""
        return self.segmenter.add_point(position_world, positive)

    def add_box(self, corner0_world, corner1_world) -> bool:
        """Add a box prompt from two opposite corners (world coordinates; (row, col) means
        the shown slice). Several boxes give several objects."""
        return self.segmenter.add_box(corner0_world, corner1_world)

    def set_positive(self, positive: bool) -> None:
        """Polarity of the next clicked points (True: object, False: background)."""
        self.segmenter.positive = positive

    def toggle_polarity(self) -> None:
        self.segmenter.positive = not self.segmenter.positive

    def next_candidate(self) -> int:
        """Show the next candidate mask (by predicted IoU); returns its rank (0 = best)."""
        return self.segmenter.next_candidate()

    def commit(self) -> CommitResult:
        """Write the previewed object(s) to the labels layer (one undo step)."""
        return self.segmenter.commit()

    def undo_last_commit(self) -> bool:
        """Take back this widget's last commit or propagation, whatever layer is active
        (pixels edited since are kept). True when something was restored."""
        return self.segmenter.undo_last_commit()

    def clear(self) -> None:
        """Remove the shown slice's prompts and the preview."""
        self.segmenter.clear()

    def refine_label(self, label_id: int) -> bool:
        """Refine an existing object of the target labels layer with new prompts."""
        return self.segmenter.refine_label(label_id)

    def pick_label_at(self, position_world) -> bool:
        """Refine the object under ``position_world`` in the target labels layer."""
        return self.segmenter.pick_label_at(position_world)

    def propagate(self, wait: bool = False, stop_range=None):
        """Propagate the previewed object through the stack and commit it as one label
        (one undo step); see :meth:`VolumePanel.propagate`."""
        return self.volume.propagate(wait=wait, stop_range=stop_range)

    def open_store(self, path, wait: bool = False):
        """Open/create an embedding store for the image; see :meth:`VolumePanel.open_store`."""
        return self.volume.open_store(path, wait=wait)

    def precompute_store(self, wait: bool = False):
        """Encode the stack's missing slices into the store (:meth:`VolumePanel.precompute`)."""
        return self.volume.precompute(wait=wait)

    @property
    def current_masks(self) -> np.ndarray | None:
        """(K, H, W) bool masks of the previewed objects on the shown slice, or None."""
        pred = self.segmenter.prediction
        return None if pred is None else pred.masks(self.segmenter.rank)

    def cleanup(self) -> None:
        """Unhook from the viewer (keys, events) and the session; runs by itself when the
        widget is destroyed. The layers stay."""
        self._cleanup()

    @property
    def status(self) -> str:
        """The last message shown to the user."""
        return self.segmenter.last_status


class _Cleanup:
    """Runs when the widget's Qt object is destroyed: unhook it from viewer and session."""

    def __init__(self, segmenter, viewer, bindings, refresh, on_model, runners, disarm, update) -> None:
        self.args = (segmenter, viewer, bindings, refresh, on_model, runners, disarm, update)

    def __call__(self, *_args) -> None:
        if self.args is None:
            return
        segmenter, viewer, bindings, refresh, on_model, runners, disarm, update = self.args
        self.args = None
        disarm()  # a pending "click a label to refine" must not outlive the widget
        for runner in runners:  # cancel and join: no result lands after the widget is gone
            runner.shutdown()
        segmenter.close()
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.disconnect(refresh)
        for layer in viewer.layers:
            layer.events.name.disconnect(refresh)
        segmenter.session.model_changed.disconnect(on_model)
        segmenter.session.embeddings_changed.disconnect(update)
        for key, previous in bindings.items():
            viewer.bind_key(key, previous, overwrite=True)
