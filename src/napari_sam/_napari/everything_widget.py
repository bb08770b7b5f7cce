"""The "Segment Everything" dock widget: every object of an image or stack into a Labels layer.

Three modes (``engine.instances``): **AIS** (micro-sam's instance decoder + watershed, seconds
per slice; the default for models with a decoder, e.g. vit_b_lm), **APG** (prompts derived
from that decoder, decoded by SAM) and **AMG** (SAM's point grid; any model, slow on a CPU).
A first pass, to correct afterwards with the interactive "Segment Anything" widget (same
session: same model, same cached or stored embeddings — AIS and APG never encode again).
Everything it does is also a method, for scripts and notebooks::

    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Everything")
    widget.session.load_model("vit_b_lm")         # shared with the interactive widget
    widget.set_image_layer(viewer.layers["cells"])
    widget.set_mode("ais")                        # "ais" | "apg" | "amg"
    widget.set_params(center_distance_threshold=0.4, min_size=20)
    labels = widget.run(scope="stack", wait=True)  # -> the Labels layer written

``scope="slice"`` segments the slice the viewer shows; ``"stack"`` every slice along the
last non-displayed axis (z of a (Z, Y, X) stack, t of a (T, Y, X) series, z at the
current t of (T, Z, Y, X)), linking overlapping objects of consecutive slices into one id.
New objects get ids above the layer's current maximum and, unless "overwrite" is on, only
fill unlabelled pixels. Labels are written through the one label writer
(:func:`.labels_io.write_objects`): exactly where napari shows them, whatever the target
layer's scale, translate or resolution; one step of the layer's undo history or nothing.
A cancelled run writes nothing; inputs are read on the GUI thread when the run starts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..engine.automatic import Progress, run_to_end
from ..engine.instance_segmentation import AisParameters
from ..engine.instances import MODES, SamInstanceSegmenter, default_mode
from ..engine.predictor import Stopped
from ..engine.prompt_generation import ApgParameters
from .everything_params import (
    AIS_SPEC,
    AMG_DEFAULTS,
    AMG_SPEC,
    APG_SPEC,
    LINK_IOU,
    MODE_CHOICES,
    MODE_TIPS,
)
from .geometry import PlaneError, base_data, current_plane, plane_pixels
from .jobs import JobRunner
from .labels_io import LabelsWriteError, new_labels_layer, write_objects
from .lifetime import on_close
from .param_form import ParamForm
from .prompt_layers import preferred_image, refill_layer_combos
from .session import (
    SamSession,
    SliceEmbeddings,
    contrast_limits_of,
    real_viewer,
    session_for,
)
from .tiles import describe_plane
from .tiling_panel import TilingPanel
from .ui import fit_narrow_docks, scrolled_body

NEW_LABELS = "new layer: SAM everything"
SCOPES = (("slice", "current slice"), ("stack", "whole stack (z or t), linked"))



class _PlaneStack:
    """The planes of one stack axis of an image layer, read one at a time (any thread)."""

    def __init__(self, slices: SliceEmbeddings) -> None:
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.slices.image(i)


class SegmentEverythingWidget(QWidget):
    """Segment everything in an image layer (a slice or a stack) into a Labels layer.

    Args:
        napari_viewer: the viewer (napari passes it when docking).
        session: the :class:`SamSession` to use; default ``session_for(napari_viewer)``,
            shared with the interactive widget (model and embeddings are reused).
    """

    def __init__(self, napari_viewer, session: SamSession | None = None) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari may hand us a proxy of it
        self.session = session if session is not None else session_for(self.viewer)
        self._build_ui()
        self.runner = JobRunner(self._report, self._progress)
        self.runner.busy_changed.connect(self._on_busy_changed)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh_layers)
        self.session.model_changed.connect(self._show_model)
        self.session.tiling_changed.connect(self._show_tiling)
        self.session.embeddings_changed.connect(self._show_tiling)
        self.viewer.dims.events.current_step.connect(self._show_tiling)
        self._image_combo.currentIndexChanged.connect(self._show_tiling)
        on_close(self, _cleanup(self.viewer, self.session, self._refresh_layers, self._show_model, self.runner,
                                self._show_tiling, self.tiling))
        self._refresh_layers()
        self._show_model(self.session.model)

    # ------------------------------------------------------------------ UI
    def showEvent(self, event) -> None:
        """Once styled (fonts known), make the dock wide enough for every control."""
        super().showEvent(event)
        fit_narrow_docks(self)

    def _build_ui(self) -> None:
        layout, footer = scrolled_body(self)
        self._model_label = QLabel()
        self._model_label.setWordWrap(True)
        layout.addWidget(self._model_label)

        data = QFormLayout()
        self._image_combo, self._labels_combo, self._scope = QComboBox(), QComboBox(), QComboBox()
        for value, text in SCOPES:
            self._scope.addItem(text, value)
        self._overwrite = QCheckBox("overwrite existing labels")
        self._image_combo.setToolTip("the image layer to segment")
        self._labels_combo.setToolTip("where the objects go: a new layer, or any Labels layer "
                                      "(objects land where napari shows them)")
        self._scope.setToolTip("the slice on display, or every slice of the stack with objects "
                               "linked through z (or t)")
        self._overwrite.setToolTip("let new objects paint over existing labels (off: they only fill "
                                   "unlabelled pixels)")
        data.addRow("Image", self._image_combo)
        data.addRow("Labels", self._labels_combo)
        data.addRow("Scope", self._scope)
        data.addRow("", self._overwrite)
        layout.addLayout(data)

        self._mode = QComboBox()
        for value, text in MODE_CHOICES:
            self._mode.addItem(text, value)
            self._mode.setItemData(self._mode.count() - 1, MODE_TIPS[value], Qt.ItemDataRole.ToolTipRole)
        self._mode.setToolTip("how objects are found; hover an entry for details")
        self._link_iou = QDoubleSpinBox()
        self._link_iou.setRange(*LINK_IOU[1:3])
        self._link_iou.setSingleStep(LINK_IOU[3])
        self._link_iou.setValue(LINK_IOU[0])
        self._link_iou.setToolTip(LINK_IOU[4])
        data.addRow("Mode", self._mode)
        data.addRow("Link IoU", self._link_iou)
        self.tiling = TilingPanel(self.session)
        layout.addWidget(self.tiling)
        self._forms = {
            "ais": ParamForm.for_dataclass("AIS parameters", AisParameters, AIS_SPEC),
            "apg": ParamForm.for_dataclass("APG parameters", ApgParameters, APG_SPEC),
            "amg": ParamForm("AMG parameters", AMG_SPEC, AMG_DEFAULTS),
        }
        for form in self._forms.values():
            layout.addWidget(form)
        self._mode.currentIndexChanged.connect(self._show_mode_form)
        self._show_mode_form()

        row = QHBoxLayout()
        self._run_button, self._cancel_button = QPushButton("Run"), QPushButton("Cancel")
        self._run_button.setToolTip("segment everything in the background (progress below)")
        self._cancel_button.setToolTip("stop; no label changes")
        self._run_button.clicked.connect(lambda: self.run(wait=False))
        self._cancel_button.clicked.connect(self.cancel)
        self._cancel_button.setEnabled(False)
        row.addWidget(self._run_button)
        row.addWidget(self._cancel_button)
        layout.addLayout(row)
        self._progress = QProgressBar()
        self._status = QLabel("")
        self._status.setWordWrap(True)
        layout.addStretch(1)
        footer.addWidget(self._progress)
        footer.addWidget(self._status)
        fit_narrow_docks(self)

    def _refresh_layers(self, event=None) -> None:
        had_image = self._image_combo.currentData() is not None
        refill_layer_combos(self.viewer, self._image_combo, self._labels_combo, NEW_LABELS)
        if not had_image and (image := preferred_image(self.viewer)) is not None:
            self._image_combo.setCurrentIndex(self._image_combo.findData(image))

    def _show_model(self, model=None) -> None:
        if model is None:
            self._model_label.setText("No model yet: load one in the Segment Anything widget "
                                      "(or widget.session.load_model(...)).")
            return
        self._show_tiling()
        has_decoder = getattr(model, "instance_decoder", None) is not None
        name = getattr(model, "model_type", type(model).__name__)
        self._model_label.setText(f"Model: {name}" + (" (with AIS decoder)" if has_decoder else
                                                       " (no AIS decoder: AMG only)"))
        items = self._mode.model()
        for mode in ("ais", "apg"):
            item = items.item(self._mode.findData(mode))
            item.setEnabled(has_decoder)
            item.setToolTip(MODE_TIPS[mode] if has_decoder else
                            f"{MODE_TIPS[mode]}. This model has none: load e.g. vit_t_lm or vit_b_lm")
        self._mode.setCurrentIndex(self._mode.findData(default_mode(model)))

    def _show_tiling(self, *_args) -> None:
        """The tiling panel follows the chosen image; its status says how the shown plane
        is cut (e.g. "tiled: 7 x 4 tiles of 1024 px (3/28 encoded)")."""
        image = self._image_combo.currentData()
        if self.tiling._layer is not image:
            self.tiling.set_layer(image)
        if image is None:
            self.tiling.set_status("")
            return
        source = self.session.source_for(image)
        try:
            plane = current_plane(self.viewer.dims, source)
        except PlaneError as exc:
            self.tiling.set_status(str(exc))
            return
        self.tiling.set_status(describe_plane(self.session, source, plane))

    def _show_mode_form(self, *_args) -> None:
        for mode, form in self._forms.items():
            form.setVisible(mode == self.mode)

    # ------------------------------------------------------------------ scripting API
    def set_image_layer(self, layer: Image) -> None:
        self._image_combo.setCurrentIndex(self._image_combo.findData(layer))

    def set_labels_layer(self, layer: Labels | None) -> None:
        """Write into this Labels layer (None: a new layer each run)."""
        self._labels_combo.setCurrentIndex(0 if layer is None else self._labels_combo.findData(layer))

    @property
    def mode(self) -> str:
        """"ais" | "apg" | "amg" (see the module docstring)."""
        return self._mode.currentData()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, got {mode!r}")
        self._mode.setCurrentIndex(self._mode.findData(mode))

    def set_params(self, mode: str | None = None, **params) -> None:
        """Set parameters by name, e.g. ``points_per_side=16`` or ``min_size=20``: those of
        ``mode`` (default: the current mode's; a name only one mode has goes there), and
        ``link_iou`` for stacks. See ``AIS_SPEC``, ``APG_SPEC``, ``AMG_SPEC``."""
        for name, value in params.items():
            if name == "link_iou":
                self._link_iou.setValue(value)
                continue
            owners = [m for m, form in self._forms.items() if name in form.fields]
            target = mode or (self.mode if self.mode in owners else (owners[0] if len(owners) == 1 else None))
            if target not in owners:
                known = sorted({n for f in self._forms.values() for n in f.fields} | {"link_iou"})
                where = f" for mode {target!r}" if target else ""
                raise ValueError(f"expected a parameter in {known}{where}, got {name!r}")
            self._forms[target].set(name, value)

    @property
    def params(self) -> dict:
        """The current mode's parameters and ``link_iou``."""
        return {**self._forms[self.mode].values(), "link_iou": self._link_iou.value()}

    @property
    def status(self) -> str:
        return self._status.text()

    @property
    def worker(self):
        """The running job's worker, or None."""
        return None if self.runner.job is None else self.runner.job.worker

    def _report(self, message: str) -> None:
        self._status.setText(message)
        self.viewer.status = message

    def run(self, scope: str | None = None, wait: bool = False):
        """Segment everything: ``scope`` "slice" | "stack" (default: the widget's choice).

        ``wait=True`` blocks and returns the Labels layer written (None when nothing ran
        or nothing could be written: :attr:`status` says why); otherwise a worker runs and
        is returned (``self.worker``).
        """
        scope = scope or self._scope.currentData()
        if scope not in dict(SCOPES):
            raise ValueError(f"expected scope in {list(dict(SCOPES))}, got {scope!r}")
        try:
            job, target = self._prepare(scope)
        except (PlaneError, ValueError, RuntimeError) as exc:
            self._report(str(exc))
            return None
        if wait:
            try:
                return self._write(target, run_to_end(job(None), self._on_progress))
            except (LabelsWriteError, ValueError, RuntimeError) as exc:
                self._report(f"segment everything failed: {exc}")
                return None
        return self.runner.start(
            job, desc="SAM: segment everything", on_yield=self._on_progress,
            on_done=lambda result: self._write(target, result),
            on_cancel=lambda: self._report("cancelled: labels unchanged"),
            is_current=lambda: self._still_current(target))

    def cancel(self) -> None:
        """Stop a running job at its next step (within a batch of prompts); nothing is written."""
        self.runner.cancel()

    def wait(self, timeout: float = 600.0) -> bool:
        """Process Qt events until the running job ended; False on timeout."""
        return self.runner.wait(timeout)

    # ------------------------------------------------------------------ internals
    def _prepare(self, scope: str):
        """On the GUI thread: read layers, parameters and normalisation; returns
        (job(cancel) -> generator, target) — the job never touches a layer."""
        if not self.session.has_model:
            raise RuntimeError("load a model first (Segment Anything widget or session.load_model)")
        image = self._image_combo.currentData()
        if image is None:
            raise ValueError("add an image layer first")
        source = self.session.source_for(image)  # the layer, or the chosen level of a pyramid
        plane = current_plane(self.viewer.dims, source)
        labels = self._labels_combo.currentData()
        segmenter = self._segmenter()
        link_iou = self._link_iou.value()
        limits = contrast_limits_of(self.session.normalisation_for(source))
        grid = self.session.grid_for(source, plane)
        target = {"image": image, "source": source, "labels": labels, "model": self.session.model,
                  "world_point": tuple(self.viewer.dims.point), "overwrite": self._overwrite.isChecked()}
        if scope == "slice" and grid is not None:
            return self._tiled_slice_job(segmenter, source, plane, grid), target
        if scope == "slice":
            _key, encode = self.session.encode_job(source, plane)
            data = base_data(source)

            def job(cancel):
                yield Progress(0, 1, "encoding")
                _key, embedding = yield from encode  # cached, stored, or encoded here
                pixels = plane_pixels(data, plane) if segmenter.mode == "amg" else None
                result = yield from segmenter.job(pixels, embedding=embedding, contrast_limits=limits,
                                                  cancel=cancel)
                return None if result is None else ([plane], result.labels[None])

            return job, target
        hidden = [a for a in range(plane.ndim) if a not in plane.axes_rc]
        if not hidden:
            raise ValueError("the image is 2D: use scope 'current slice'")
        slices = SliceEmbeddings(self.session, source, plane, axis=hidden[-1])
        tiled = None if grid is None else [self.session.tile_source(source, slices.plane(i), grid)
                                           for i in range(len(slices))]

        def job(cancel):
            def embedding_for(z):  # tiled: the slice's tiles, cached or encoded once
                return slices.embedding(z) if tiled is None else (lambda k: tiled[z].embedding(k, cancel))

            try:
                stack = yield from segmenter.stack_job(_PlaneStack(slices), contrast_limits=limits,
                                                       embedding_for=embedding_for, link_iou=link_iou,
                                                       cancel=cancel, grid=grid)
            except Stopped:  # cancelled inside a tile's encode
                return None
            return None if stack is None else ([slices.plane(i) for i in range(len(slices))], stack)

        return job, target

    def _tiled_slice_job(self, segmenter, source, plane, grid):
        """The job of one tiled plane: every tile through the engine's tiled run, its
        embeddings from the session (cached by the interactive widget, or encoded here
        once and cached for it); objects stitched across tiles."""
        tiles = self.session.tile_source(source, plane, grid)

        def job(cancel):
            try:
                result = yield from segmenter.job(tiles.image, contrast_limits=tiles.contrast_limits, grid=grid,
                                                  embedding_for=lambda k: tiles.embedding(k, cancel),
                                                  cancel=cancel)
            except Stopped:  # cancelled inside a tile's encode
                return None
            return None if result is None else ([plane], np.asarray(result.labels)[None])

        return job

    def _segmenter(self) -> SamInstanceSegmenter:
        """The engine for the current mode and parameters (ValueError: e.g. AIS without a
        decoder, which the status line then explains)."""
        mode, values = self.mode, self._forms[self.mode].values()
        if mode == "ais":
            return SamInstanceSegmenter(self.session.model, "ais",
                                        ais=dataclasses.replace(AisParameters(), **values))
        if mode == "apg":
            return SamInstanceSegmenter(self.session.model, "apg",
                                        apg=dataclasses.replace(ApgParameters(), **values))
        min_size = values.pop("min_size")
        return SamInstanceSegmenter(self.session.model, "amg", amg=values, amg_min_size=min_size)

    def _still_current(self, target) -> bool:
        layers = self.viewer.layers
        return (target["image"] in layers and self.session.model is target["model"]
                and (target["labels"] is None or target["labels"] in layers))

    def _on_progress(self, step: Progress) -> None:
        self.runner.step(step.done, step.total)
        self._status.setText(step.message)
        if step.message.startswith("tile "):
            self.session.embeddings_changed.emit()  # tiles cached: status lines follow

    def _on_busy_changed(self, busy: bool) -> None:
        self._run_button.setEnabled(not busy)
        self._cancel_button.setEnabled(busy)

    def _write(self, target, result) -> Labels | None:
        """Write (P, H, W) object ids of P planes through the label writer: ids above the
        layer's maximum, onto free pixels unless overwriting, one undo step or nothing."""
        if result is None:  # cancelled inside the engine
            self._report("cancelled: labels unchanged")
            return None
        planes, stack = result
        labels = target["labels"]
        created = labels is None or labels not in self.viewer.layers
        if created:
            labels = new_labels_layer(self.viewer, target["source"], "SAM everything")
        try:
            written = write_objects(labels, target["source"], planes, stack, world_point=target["world_point"],
                                    overwrite=target["overwrite"])
        except LabelsWriteError as exc:
            if created:  # leave no empty layer behind
                self.viewer.layers.remove(labels)
            self._report(f"nothing written: {exc}")
            return None
        covered = f" ({written.covered} more lay entirely on existing labels)" if written.covered else ""
        self._report(f"{len(written.label_ids)} objects written to '{labels.name}'{covered}")
        self._show_tiling()
        return labels


def _cleanup(viewer, session, refresh, show_model, runner, show_tiling, panel):
    """What to undo when the widget is closed (a plain function: Qt no longer calls
    methods of a destroyed widget): cancel and join the job, unhook from viewer/session."""

    def run(*_args) -> None:
        runner.shutdown()
        panel.close_panel()
        session.tiling_changed.disconnect(show_tiling)
        session.embeddings_changed.disconnect(show_tiling)
        viewer.dims.events.current_step.disconnect(show_tiling)
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.disconnect(refresh)
        session.model_changed.disconnect(show_model)

    return run
