"""``InteractiveSegmenter``: prompts on the shown slice -> live SAM masks -> Labels.

The logic behind :class:`~napari_sam._napari.widget.SegmentAnythingWidget`, with no Qt
widgets of its own. It listens to the viewer (slider, 2D/3D, layers) and to the prompt
layers, decodes on every prompt change (never re-encodes; see :mod:`.decode` for the
prompt rules), encodes slices through the shared
:class:`~napari_sam._napari.session.SamSession` in a worker (:class:`.encoding.SliceEncoder`),
and writes objects through the one label writer (:func:`.labels_io.write_objects`).
"""

from __future__ import annotations

import contextlib
import logging
import types

import numpy as np
from psygnal import Signal

from ..model.interrupt import raise_if_stopped
from .decode import Prediction, decode_objects
from .decode_ahead import DecodeAhead
from .encoding import SliceEncoder
from .geometry import PlaneError, SlicePlane, current_plane
from .jobs import paint_pending_now
from .labels_io import (
    CommitResult,
    LabelsWriteError,
    ensure_labels_layer,
    undo_write,
    write_objects,
)
from .prompt_input import PromptsFromPython
from .prompt_layers import (
    BOXES_ROLE,
    POINTS_ROLE,
    PREVIEW_ROLE,
    ensure_boxes_layer,
    ensure_points_layer,
    ensure_preview_layer,
    find_layer,
    has_role,
    prompt_indices_on_plane,
    raise_prompt_layers,
    read_boxes,
    read_points,
    remove_prompts,
    show_preview,
)
from .tiled_segmenter import TiledPlanes

try:  # napari's Points "add" mode adds the point on release when the release lies within
    # this distance (canvas px) of the press, whatever the path (a drag out and back adds
    # it too); moves beyond it are left to the camera, which pans. Private in napari 0.9.
    from napari.layers.points._points_mouse_bindings import (
        DRAG_DIST_THRESHOLD as DRAG_THRESHOLD_PX,
    )
except ImportError:  # moved or renamed in another napari: its value in napari 0.9.2
    DRAG_THRESHOLD_PX = 5

# the cursor counts as resting (a click may follow) after this long without a move
REST_MS = 40

log = logging.getLogger(__name__)


def _canvas_px(event) -> tuple[int, ...]:
    """A mouse event's canvas position in whole pixels, (x, y): the press and the moves
    are compared in this one form."""
    return tuple(int(v) for v in event.pos)


class _Same:
    """Wraps an object for a decode key: equal only to a wrapper of the very same object
    (unlike id(), which a new object may reuse once the old one is freed)."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    __hash__ = None


class InteractiveSegmenter(TiledPlanes, PromptsFromPython):
    """Interactive SAM segmentation in ``viewer`` through ``session``.

    Large planes are tiled (see :class:`~napari_sam._napari.tiled_segmenter.TiledPlanes`);
    a multiscale layer is segmented on the session's level for it (:attr:`source`);
    prompts from Python: :class:`~napari_sam._napari.prompt_input.PromptsFromPython`.

    Attributes:
        image_layer: the layer being segmented (set with :meth:`set_image_layer`).
        labels_layer: commit target; None creates "SAM labels" on the first commit.
        overwrite: commits may paint over existing non-zero labels (default False).
        auto_encode: encode the shown slice as soon as it is shown (default True).
        multimask: "auto" (3 candidates for a single point, else 1), True or False.
        rank: which candidate is shown: 0 = best predicted IoU, 1 = second…
        decode_ahead: while the cursor rests on the canvas, decode in the background what
            a click there would add, so the click's preview needs no decode (default True).
    Signals: ``changed()`` after any state change, ``status(str)`` for the user.
    """

    changed = Signal()
    status = Signal(str)

    def __init__(self, viewer, session) -> None:
        self.viewer, self.session = viewer, session
        self.image_layer = self.labels_layer = None
        self.points_layer = self.boxes_layer = None
        self.overwrite, self.auto_encode, self.multimask = False, True, "auto"
        self.decode_ahead = True
        self._ahead = DecodeAhead()
        self._hover = None  # world position of the cursor's last move on the canvas (None: not resting there)
        self._hover_xy = None  # its canvas (x, y) px
        self._press_xy = None  # canvas (x, y) px of the last press
        self.canvas_cursor = None  # a CanvasCursor, set by the widget: where the cursor really is
        self._rest_timer = None  # a QTimer, made on the first move
        self.plane: SlicePlane | None = None
        self.prediction: Prediction | None = None
        self._decoded: tuple | None = None  # (decode key, the Prediction decoded from it)
        self.rank = 0
        self.refine_id: int | None = None
        self._refine_mask = None
        self._positive = True
        self._muted = 0
        self.last_status = ""
        self.history: list = []  # WriteRecords of this widget's writes, newest last
        self.encoder = SliceEncoder(session, self._shown, self.report, self._on_embedding_ready,
                                    lambda: self.auto_encode)
        self._init_tiles()
        dims = viewer.dims.events
        self._connections = [
            (dims.current_step, self._on_view_changed),
            (dims.ndisplay, self._on_view_changed),
            (dims.order, self._on_view_changed),
            (viewer.layers.events.removed, self._on_layer_removed),
            (viewer.layers.events.inserted, self._on_layer_inserted),
            (session.model_changed, self._on_model_changed),
            (session.tiling_changed, self._on_view_changed),
            (viewer.camera.events.center, self._on_camera),
            (viewer.camera.events.zoom, self._on_camera),
            (viewer.camera.events.center, self._forget_hover),  # the cursor's world spot moved
            (viewer.camera.events.zoom, self._forget_hover),
            (viewer.dims.events.current_step, self._forget_hover),
        ]
        for signal, slot in self._connections:
            signal.connect(slot)
        viewer.mouse_drag_callbacks.append(self._on_press)
        viewer.mouse_move_callbacks.append(self._on_hover)

    def close(self) -> None:
        """Stop and join the background encoding; disconnect from the viewer and the
        session (the layers stay)."""
        self.encoder.shutdown()
        for signal, slot in self._connections:
            with contextlib.suppress(Exception):
                signal.disconnect(slot)
        self._connections = []
        for callbacks, callback in ((self.viewer.mouse_drag_callbacks, self._on_press),
                                    (self.viewer.mouse_move_callbacks, self._on_hover)):
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
        self._forget_hover()
        self._ahead.close()
        if self.canvas_cursor is not None:
            with contextlib.suppress(RuntimeError):  # (the canvas may be gone already)
                self.canvas_cursor.canvas.removeEventFilter(self.canvas_cursor)
            self.canvas_cursor = None
        self._disconnect_prompt_layers()

    # ------------------------------------------------------------------ state
    def report(self, message: str) -> None:
        """Tell the user (widget status line, napari's status bar)."""
        self.last_status = message
        self.viewer.status = message
        self.status.emit(message)

    @property
    def source(self):
        """What is segmented: the image layer, or a :class:`~napari_sam._napari.levels.
        LevelView` of the chosen level of a multiscale layer (None: no image)."""
        return None if self.image_layer is None else self.session.source_for(self.image_layer)

    def _shown(self):
        """(image source, plane) on screen for the one-encode path, or None (nothing shown,
        or a tiled plane: :class:`TiledPlanes` encodes it)."""
        if self.image_layer is None or self.plane is None or self.tiles is not None:
            return None
        return self.source, self.plane

    def _on_embedding_ready(self) -> None:
        self.update_preview()
        if self.prediction is None:
            self.report("slice encoded: click (points) or draw boxes to segment")
        self.changed.emit()

    # the encoder's state, for the widget and scripts
    @property
    def encoding(self) -> bool:
        return self.encoder.encoding

    @property
    def embedding_ready(self) -> bool:
        """The shown slice is encoded (tiled: every tile wanted so far is)."""
        if self.tiles is not None:
            return not self.encoding and self.tile_encoder.pending == 0
        return self.encoder.ready

    def request_encoding(self, wait: bool = False) -> bool:
        if self.tiles is not None:
            return self._request_tiles(wait)
        ready = self.encoder.request(wait=wait)
        if wait and ready:
            self.update_preview()
        self.changed.emit()
        return ready

    def wait_for_encoding(self, timeout: float = 120.0) -> bool:
        return self.encoder.wait(timeout)

    def target_labels(self):
        """The commit target: the chosen Labels layer, or "SAM labels" (created if missing)."""
        if self.labels_layer is None or self.labels_layer not in self.viewer.layers:
            with self._keep_active_layer():
                self.labels_layer = ensure_labels_layer(self.viewer, self.source)
        return self.labels_layer

    @contextlib.contextmanager
    def _keep_active_layer(self):
        active = self.viewer.layers.selection.active
        yield
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active

    @property
    def positive(self) -> bool:
        """Polarity of new points: True adds object points, False background points."""
        return self._positive

    @positive.setter
    def positive(self, value: bool) -> None:
        self._positive = bool(value)
        if self.points_layer is not None:
            self.points_layer.selected_data = set()  # else the change recolours them
            self.points_layer.feature_defaults = {"positive": self._positive}
        self.report(f"new points are {'positive (object)' if value else 'negative (background)'}")
        self.changed.emit()

    def set_image_layer(self, layer) -> None:
        """Segment ``layer`` (an Image layer; None to stop). Prompts of another image are
        removed; prompt layers are created if missing and the points layer is made active."""
        if layer is self.image_layer and (layer is None or self.points_layer is not None):
            return
        self.image_layer = layer
        self.encoder.reset()
        self._ahead.forget()  # (a result holds the old image's embedding)
        self.prediction, self._decoded, self.refine_id, self.plane, self._seen = None, None, None, None, None
        if layer is None:
            self.changed.emit()
            return
        with self._mute():
            self._ensure_prompt_layers()
            for prompts in (self.points_layer, self.boxes_layer):
                remove_prompts(prompts, range(len(prompts.data)))
        self.viewer.layers.selection.active = self.points_layer
        self.points_layer.mode = "add"
        self.boxes_layer.mode = "add_rectangle"
        self.sync()
        if self.plane is not None and find_layer(self.viewer, PREVIEW_ROLE) is None:
            self._ensure_preview(self.plane, None if self.tiles is None else (0, 0, 1, 1))

    def _ensure_prompt_layers(self) -> None:
        with self._keep_active_layer():
            points = ensure_points_layer(self.viewer, self.image_layer)
            boxes = ensure_boxes_layer(self.viewer, self.image_layer)
        if points is not self.points_layer or boxes is not self.boxes_layer:
            self._disconnect_prompt_layers()
            self.points_layer, self.boxes_layer = points, boxes
            for prompts in (points, boxes):
                prompts.events.data.connect(self._on_prompts_changed)
            points.selected_data = set()
            points.feature_defaults = {"positive": self._positive}

    def _disconnect_prompt_layers(self) -> None:
        for prompts in (self.points_layer, self.boxes_layer):
            if prompts is not None:
                with contextlib.suppress(Exception):
                    prompts.events.data.disconnect(self._on_prompts_changed)

    @contextlib.contextmanager
    def _mute(self):
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    # ------------------------------------------------------------------ events
    def _on_view_changed(self, event=None) -> None:
        with self._reported("could not show the segmentation of this view"):
            self.sync()

    def _on_prompts_changed(self, event=None) -> None:
        action = str(getattr(event, "action", "")).lower()
        if self._muted or action.endswith(("adding", "removing", "changing")):
            return
        with self._reported("could not segment the prompts"):
            self.update_preview()

    @contextlib.contextmanager
    def _reported(self, what: str):
        """In napari's event handlers: a failure goes to the status line (and the log, with
        its traceback), not into napari's event handling (a traceback dialog). The preview
        is cleared: masks of earlier prompts must not stay shown, nor be committed, as if
        they were those of the prompts now on screen. Yields an outcome whose ``failed``
        tells."""
        outcome = types.SimpleNamespace(failed=False)
        try:
            yield outcome
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory in the decoder
            outcome.failed = True
            log.exception(what)
            self.prediction = self._decoded = None
            with contextlib.suppress(Exception):
                self._show(None)
            self.report(f"{what}: {type(exc).__name__}: {exc}")
            self.changed.emit()

    def _on_press(self, viewer, event):
        """A press that napari's Points "add" mode will turn into a point (on release,
        if the mouse stays within its drag threshold): decode with that point now, so the
        preview is drawn while the button is held; the release's point then finds its
        masks made (:meth:`update_preview` does not decode the same prompts twice). A
        press that becomes a drag (napari pans) puts the previous preview back, unless
        something else changed the preview meanwhile (a drag that comes back within the
        threshold still adds its point: its data event then decodes it). A failed decode
        is reported and lets napari go on (the click still adds its point)."""
        points = self.points_layer
        self._forget_hover()  # the rest ended with this press (a later move starts another)
        self._press_xy = _canvas_px(event)
        if event.button != 1 or event.modifiers or not self._click_adds_point():
            return
        before = self.prediction, self._decoded
        with self._reported("could not segment the click") as outcome:  # (raised, napari would not add the point)
            self._predict(*self._prompts(adding=points.world_to_data(event.position)))
        if outcome.failed:
            return
        mine = self.prediction  # the press's own result (None when nothing was decoded)
        # drawn now, not after napari's handling of a release already queued (a quick
        # click): its Points add and highlight take tens of ms before the next frame
        paint_pending_now()
        start = np.asarray(event.pos, float)
        yield
        while event.type == "mouse_move":
            if np.linalg.norm(np.asarray(event.pos, float) - start) >= DRAG_THRESHOLD_PX:
                break  # a drag: napari pans, no point is added
            yield
        else:
            return  # released: napari adds the point (or not: then the next prompt decodes)
        if mine is not None and self.prediction is mine and mine is not before[0] and self.plane is not None:
            self.prediction, self._decoded = before  # not a newer one made during the hold
            self._show(self.prediction)
            self.changed.emit()

    def _click_adds_point(self) -> bool:
        """A plain left click on the canvas now adds a point that is decoded at once: the
        points layer active in "add" mode and shown, a 2D untiled view, a model, and the
        shown slice's embedding ready (made current in the predictor)."""
        points, viewer = self.points_layer, self.viewer
        return not (self._muted or points is None or self.tiles is not None or self.plane is None
                    or viewer.layers.selection.active is not points or points.mode != "add"
                    or not points.visible or viewer.dims.ndisplay != 2 or not self.session.has_model
                    or not self.encoder.activate())

    def _on_hover(self, viewer, event) -> None:
        """The cursor moved over the canvas (no button held): once it rests REST_MS,
        :meth:`_decode_hovered`. Cheap: this runs on every move."""
        if not self.decode_ahead or self.points_layer is None:
            return
        xy = _canvas_px(event)
        if xy == self._press_xy:  # not moved since the click (a move napari delivers late):
            return  # a click there again would only repeat the point just added
        self._press_xy = None
        self._hover, self._hover_xy = tuple(event.position), xy
        if self._rest_timer is None:
            from qtpy.QtCore import QTimer

            self._rest_timer = QTimer()
            self._rest_timer.setSingleShot(True)
            self._rest_timer.setInterval(REST_MS)
            self._rest_timer.timeout.connect(self._decode_hovered)
        self._rest_timer.start()  # (re)started: fires once the cursor rests

    def _forget_hover(self, event=None) -> None:
        """The cursor's rest is over (a press, a view change, the widget closing): no
        background decode for it."""
        self._hover = None
        if self._rest_timer is not None:
            self._rest_timer.stop()

    def _decode_hovered(self) -> None:
        """Start decoding, in the background, the prompts a click at the resting cursor
        would make (see :mod:`.decode_ahead`): :meth:`_predict` then takes the result
        instead of decoding. Nothing is shown or reported from here: a failure is logged
        and the click decodes (and reports) as without it."""
        try:
            self._start_decode_ahead()
        except Exception:  # noqa: BLE001 - a guess; never a traceback dialog for it
            log.debug("no decode ahead for the resting cursor", exc_info=True)

    def _start_decode_ahead(self) -> None:
        if (not self.decode_ahead or self._hover is None or self.encoding
                or not getattr(self.viewer, "mouse_over_canvas", True) or not self._click_adds_point()):
            return
        if self._ahead.busy:  # one at a time: try again when it is done
            self._rest_timer.start()
            return
        cursor = self.canvas_cursor
        if cursor is not None and cursor.resend_if_dropped(self._hover_xy):
            self._rest_timer.stop()  # napari handled the dropped move: _hover is where the cursor rests
            if self._hover is None:
                return
        points = self.points_layer
        if len(self._hover) != points.ndim:  # the world's dimensions changed since the move
            return
        points_rc, point_labels, boxes_xyxy, _ = self._prompts(adding=points.world_to_data(self._hover))
        if len(points_rc) != len(self._prompts()[0]) + 1:
            return  # off the image or off this slice: a click there adds no prompt here
        key = self._decode_key(points_rc, point_labels, boxes_xyxy)
        if self._decoded is not None and self._decoded[0] == key:
            return
        decode = self._decoder(points_rc, point_labels, boxes_xyxy, self.session.predictor.snapshot())
        rank = self.rank

        def decode_and_upsample() -> Prediction:
            prediction = decode()
            raise_if_stopped()
            prediction.crops(rank)  # the shown candidate's upsampling too
            return prediction

        self._ahead.start(key, decode_and_upsample)

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if layer is self.image_layer:
            self.session.invalidate_layer(layer)
            self.set_image_layer(None)
        if layer is self.labels_layer:
            self.labels_layer = None
        if layer is self.points_layer or layer is self.boxes_layer:
            self._disconnect_prompt_layers()
            self.points_layer = self.boxes_layer = None
            if self.image_layer is not None:  # clicks need it: bring it back (after the
                from qtpy.QtCore import QTimer  # removal, unless the image went too)

                QTimer.singleShot(0, lambda name=layer.name: self._restore_prompt_layers(name))
        self.changed.emit()

    def _restore_prompt_layers(self, removed_name: str) -> None:
        if self._connections and self.image_layer is not None and self.image_layer in self.viewer.layers:
            self._ensure_prompt_layers()
            self.report(f"'{removed_name}' was removed: made a new one (choose no image to stop)")

    def _on_layer_inserted(self, event) -> None:
        if not has_role(event.value, POINTS_ROLE, BOXES_ROLE, PREVIEW_ROLE) and self.points_layer is not None:
            with self._keep_active_layer():
                raise_prompt_layers(self.viewer)  # a new image must not hide the prompts

    def _on_model_changed(self, model=None) -> None:
        self.encoder.reset()
        self._ahead.forget()  # (a result holds the old model)
        self.prediction, self._decoded, self._seen = None, None, None
        self.sync()

    # ------------------------------------------------------------------ view -> preview
    def sync(self) -> None:
        """Re-read the view (slice, 2D/3D); encode the shown slice if needed; re-decode."""
        if self.image_layer is None:
            return
        source = self.source
        try:
            plane = current_plane(self.viewer.dims, source)
        except PlaneError as exc:
            plane = None
            self.report(str(exc))
        grid = None if plane is None else self.session.grid_for(source, plane)
        moved = (source, plane, grid) != self._seen
        if moved:
            self._seen = (source, plane, grid)
            self.plane, self.prediction, self._decoded, self.rank = plane, None, None, 0
            self.refine_id = self._refine_mask = None
            self._prompt_tiles = []
            self._show(None)
        self._current_tiles()
        if plane is None or (not moved and self.prediction is not None):
            self.changed.emit()
            return
        if self.tiles is not None:
            self._want_tiles()
        elif self.auto_encode and self.session.has_model and not self.encoder.activate():
            self.encoder.request()
        self.update_preview()
        self.changed.emit()

    def _prompts(self, adding=None):
        """(points_rc, point_labels, boxes_xyxy, outside) of the shown plane; ``adding``: a
        point (data coordinates of the points layer) about to be added, read with them."""
        empty = (np.zeros((0, 2)), np.zeros(0, int), 0)
        source = self.source
        pts = read_points(self.points_layer, source, self.plane, adding) if self.points_layer else empty
        boxes = read_boxes(self.boxes_layer, source, self.plane) if self.boxes_layer else (np.zeros((0, 4)), 0)
        return pts[0], pts[1], boxes[0], pts[2] + boxes[1]

    def update_preview(self) -> None:
        """Decode the prompts of the shown slice and show the result (no re-encoding)."""
        if self.image_layer is None or self.plane is None:
            return
        self._predict(*self._prompts())

    def _predict(self, points_rc, point_labels, boxes_xyxy, outside) -> None:
        """:meth:`update_preview` for given prompts of the shown plane."""
        if outside:
            self.report(f"ignored {outside} prompt(s) outside the image '{self.image_layer.name}'")
        if len(points_rc) == 0 and len(boxes_xyxy) == 0 and self.refine_id is None:
            self.prediction = self._decoded = None
            self._show(None)
            self.changed.emit()
            return
        if not self.session.has_model:
            self.report("load a model first (Load model)")
            return
        if self._current_tiles() is not None:
            self._update_tiled(points_rc, point_labels, boxes_xyxy)
            return
        if not self.encoder.activate():
            if self.auto_encode:
                self.encoder.request()
                self.report("encoding this slice… your prompts apply when it is ready")
            else:
                self.report("this slice is not encoded yet: encode it to apply the prompts")
            return
        key = self._decode_key(points_rc, point_labels, boxes_xyxy)
        shown = self._decoded is not None and self._decoded[1] is self.prediction and self._decoded[0] == key
        if self.prediction is None or not shown:  # else these very masks are shown already
            ahead = self._ahead.take(key)  # made while the cursor rested
            self.prediction = ahead if ahead is not None else self._decode(points_rc, point_labels, boxes_xyxy)
            self._decoded = (key, self.prediction)
            self._show(self.prediction)
        self.changed.emit()

    def _decode_key(self, points_rc, point_labels, boxes_xyxy) -> tuple:
        """What a decode of the shown plane depends on: prompts, refined object, candidate
        rule, embedding and model (equal keys give equal masks)."""
        predictor = self.session.predictor
        arrays = tuple((a.shape, a.tobytes()) for a in (np.asarray(points_rc, float), np.asarray(point_labels, int),
                                                        np.asarray(boxes_xyxy, float)))
        return (self.plane, arrays, self.refine_id, _Same(self._refine_mask), self.multimask, _Same(predictor),
                _Same(predictor.get_embedding()))

    def _decode(self, points_rc, point_labels, boxes_xyxy) -> Prediction:
        return self._decoder(points_rc, point_labels, boxes_xyxy, self.session.predictor)()

    def _decoder(self, points_rc, point_labels, boxes_xyxy, predictor):
        """``decode() -> Prediction`` of these prompts of the shown plane with ``predictor``,
        from the state the decode key describes as it is now (so it may run later, in
        another thread: see :mod:`.decode_ahead`)."""
        plane, refine_id, refine_mask, multimask = self.plane, self.refine_id, self._refine_mask, self.multimask
        tiled = self.tiles is not None

        def decode() -> Prediction:
            if refine_id is not None and len(points_rc) == 0 and len(boxes_xyxy) == 0:
                return Prediction.from_masks(plane, refine_mask[None], crop=tiled)
            return decode_objects(predictor, plane, points_rc, point_labels, boxes_xyxy, refine_mask, multimask)

        return decode

    def _show(self, prediction: Prediction | None) -> None:
        preview = find_layer(self.viewer, PREVIEW_ROLE)
        if prediction is None:
            if preview is not None and self.plane is not None and preview.metadata.get("napari_sam_plane") == self.plane:
                show_preview(preview, self.plane, None)
            elif preview is not None and preview.data.any():
                preview.data = np.zeros_like(preview.data)
            return
        placed = prediction.ids(self.rank, crop=not prediction.tiled)  # the masks' box: not the plane
        if placed is None:  # every mask is empty
            if preview is not None and preview.metadata.get("napari_sam_plane") == prediction.plane:
                show_preview(preview, prediction.plane, None)
        else:
            ids, (r0, c0) = placed
            # the preview spans the plane (untiled) or the objects' region (tiled)
            region = (r0, c0, *ids.shape) if prediction.tiled else (0, 0, *prediction.plane.shape_hw)
            if (preview is None or preview.metadata.get("napari_sam_plane") != prediction.plane
                    or tuple(preview.metadata.get("napari_sam_region", ())) != region):
                preview = self._ensure_preview(prediction.plane, region)
            show_preview(preview, prediction.plane, np.minimum(ids, 255).astype(np.uint8),
                         (r0 - region[0], c0 - region[1]))
        iou = prediction.chosen_iou(self.rank)
        pixels = prediction.pixels(self.rank)
        what = ", ".join(f"{p} px (IoU {q:.2f})" for p, q in zip(pixels, iou))
        msg = f"{len(pixels)} object(s): {what}"
        if prediction.num_candidates > 1:
            ranked = " / ".join(f"{v:.2f}" for v in prediction.iou[0][prediction.order[0]])
            msg = (f"candidate {self.rank % prediction.num_candidates + 1}/{prediction.num_candidates}"
                   f" (predicted IoUs {ranked}; K cycles): {msg}")
        if self.refine_id is not None:  # say it on every update: the user must know
            msg = f"refining label {self.refine_id} (commit replaces it): {msg}"
        self.report(msg)

    def _ensure_preview(self, plane: SlicePlane, region=None):
        """The preview layer placed on ``plane`` (``region`` (r0, c0, h, w) of it), under
        the prompt layers. Made when an image is chosen: napari's first Labels visual costs
        a second or two here, which must not land between a click and its mask."""
        with self._keep_active_layer():
            preview = ensure_preview_layer(self.viewer, self.source, plane, region)
        if self.points_layer in self.viewer.layers:  # keep prompts drawn on top
            i, j = self.viewer.layers.index(preview), self.viewer.layers.index(self.points_layer)
            if i > j:
                self.viewer.layers.move(i, j)
        return preview

    # ------------------------------------------------------------------ actions
    def next_candidate(self) -> int:
        """Show the next of the candidate masks (by predicted IoU); returns the new rank."""
        if self.prediction is None or self.prediction.num_candidates == 1:
            self.report("only one candidate mask (a single point gives three)")
            return self.rank
        self.rank = (self.rank + 1) % self.prediction.num_candidates
        self._show(self.prediction)
        self.changed.emit()
        return self.rank

    def commit(self) -> CommitResult:
        """Write the shown object(s) into the target Labels layer (one undo step, or
        nothing when it cannot be written: the status line says why) and clear this
        slice's prompts. Returns what was written."""
        if self.prediction is None or self.plane is None:
            prompts = self._prompts() if self.plane is not None else None
            if prompts is not None and (len(prompts[0]) or len(prompts[2])) and not self.session.has_model:
                self.report("nothing to commit: load a model first (Load model)")
            elif prompts is not None and (len(prompts[0]) or len(prompts[2])):
                self.report("nothing to commit yet: the slice is still being encoded")
            else:
                self.report("nothing to commit: add a point or a box first")
            return CommitResult([], [], [])
        placed = self.prediction.ids(self.rank, last_wins=self.overwrite)
        if placed is None:
            self.report("nothing to commit: the mask is empty")
            return CommitResult([], [], [])
        ids, offset_rc = placed
        refining = self.refine_id is not None and int((self.prediction.pixels(self.rank) > 0).sum()) == 1
        try:
            labels = self.target_labels()
            result = write_objects(
                labels, self.source, [self.plane], ids[None], offset_rc=offset_rc,
                world_point=self.viewer.dims.point, overwrite=self.overwrite,
                fixed_ids={int(ids.max()): self.refine_id} if refining else None,
                replace_id=self.refine_id if refining else None)
        except LabelsWriteError as exc:
            self.report(f"not committed: {exc}")
            return CommitResult([], [], [])
        except Exception as exc:  # noqa: BLE001 - e.g. a storage backend refusing the write
            self.report(f"not committed: {type(exc).__name__}: {exc}")
            return CommitResult([], [], [])
        if not result.label_ids:
            self.report("nothing committed: the object lies entirely on existing labels "
                         "(tick 'overwrite existing labels' to paint over them); no id used")
            return result
        kept = f"; {sum(result.skipped)} px kept from existing labels" if sum(result.skipped) else ""
        covered = f"; {result.covered} object(s) entirely on existing labels, not written" if result.covered else ""
        self.remember(result)
        self.clear(status=False)
        self.report(f"committed label(s) {result.label_ids} to '{labels.name}'{kept}{covered}")
        return result

    def remember(self, result: CommitResult) -> None:
        """Keep a write so that :meth:`undo_last_commit` can take it back."""
        if result.record is not None:
            self.history.append((list(result.label_ids), result.record))
            del self.history[:-20]  # the last 20 writes

    def undo_last_commit(self) -> bool:
        """Take back this widget's last write (commit or propagation), whatever layer is
        active: its pixels that nobody changed since get their old values (one undo step
        of that Labels layer). True when something was restored."""
        while self.history:
            ids, record = self.history.pop()
            layer = record.layer()
            if layer is None or layer not in self.viewer.layers:
                continue
            restored, left = undo_write(record)
            extra = f"; {left} px edited since were left as they are" if left else ""
            self.report(f"undid label(s) {ids} in '{layer.name}' ({restored} px restored{extra})"
                        if restored else f"label(s) {ids} were already changed since: nothing to undo")
            self.changed.emit()
            return restored > 0
        self.report("nothing to undo: no commit of this widget is left")
        return False

    def clear(self, status: bool = True) -> None:
        """Remove the prompts of the shown slice and the preview; stop refining."""
        self.refine_id = self._refine_mask = None
        self._prompt_tiles = []
        if self.plane is not None and self.image_layer is not None:
            with self._mute():
                for prompts in (self.points_layer, self.boxes_layer):
                    if prompts is not None:
                        remove_prompts(prompts, prompt_indices_on_plane(prompts, self.source, self.plane))
        self.prediction, self._decoded, self.rank = None, None, 0
        self._show(None)
        if status:
            self.report("prompts cleared")
        self.changed.emit()
