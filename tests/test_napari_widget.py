"""The Segment Anything widget in a real (headless, Xvfb) napari viewer.

Geometry is proved with the oracle model (tests/oracle.py): each object is drawn with its
own intensity on a zero background, so "the region under the click" is the true object.
One viewer serves the whole module (creating one costs seconds on a 2-core machine).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from oracle import OracleSam

pytestmark = pytest.mark.gui


def iou(a, b) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def objects_2d(shift=0, zoom=1):
    """(160, 256) * zoom uint8 image with three objects (values 60, 130, 200) and its
    label map. Longest side 256 * zoom: with OracleSam(image_size=256 * zoom) the model
    input is the image itself, so the oracle's own resampling blur (which shrinks objects
    by about one pixel) does not blur the IoU checks."""
    h, w = 160 * zoom, 256 * zoom
    img = np.zeros((h, w), np.uint8)
    z, s = zoom, shift * zoom
    img[(20 * z + s) : (75 * z + s), 20 * z : 95 * z] = 60
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 100 * z) ** 2 + (xx - 160 * z - s) ** 2 < (35 * z) ** 2] = 130
    img[95 * z : 150 * z, (15 * z + s) : (90 * z + s)] = 200
    truth = np.select([img == 60, img == 130, img == 200], [1, 2, 3], 0)
    return img, truth


def centroid(mask) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


class SlowOracle(OracleSam):
    """The oracle with an encoder that takes ``delay`` seconds (sleeping, like a busy
    worker thread that releases the GIL as torch does)."""

    def __init__(self, delay: float, **kw) -> None:
        super().__init__(**kw)
        self.delay = delay

    def encode(self, x):
        time.sleep(self.delay)
        return super().encode(x)


def test_click_on_each_object_commits_it_2d_scaled(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, scale=(0.5, 0.8), translate=(10.0, -5.0), name="cells")
    widget = make_widget(OracleSam(image_size=256))
    assert widget.segmenter.image_layer is layer  # picked automatically
    assert widget.encode_current_slice(wait=True)
    for k in (1, 2, 3):
        assert widget.add_point(layer.data_to_world(centroid(truth == k)))
        assert widget.current_masks.shape == (1, 160, 256)
        result = widget.commit()
        assert result.label_ids == [k]
    labels = viewer.layers["SAM labels"]
    for k in (1, 2, 3):
        assert iou(labels.data == k, truth == k) >= 0.95, k
    assert widget._image_combo.currentData() is layer  # the UI follows the state
    assert widget._labels_combo.currentText() == "SAM labels"
    labels.name = "nuclei"
    assert widget._labels_combo.currentText() == "nuclei"
    assert len(viewer.layers["SAM points"].data) == 0  # prompts cleared by commit
    labels.undo()
    assert not (labels.data == 3).any() and (labels.data == 2).any()
    labels.undo()
    labels.undo()
    assert labels.data.max() == 0
    assert widget.session.model.encode_calls == 1  # every click decoded, none re-encoded


def test_3d_slices_with_scale_translate_and_cache(viewer, make_widget, qtbot):
    stack = np.stack([objects_2d(shift=4 * z)[0] for z in range(4)])
    layer = viewer.add_image(stack, scale=(2.0, 0.5, 0.7), translate=(3.0, 1.0, -2.0), name="stack")
    model = OracleSam(image_size=256)
    widget = make_widget(model)
    for z, k in ((0, 1), (3, 2), (1, 3)):
        viewer.dims.set_point(0, layer.data_to_world([z, 0, 0])[0])
        qtbot.waitUntil(lambda: widget.segmenter.embedding_ready, timeout=10000)  # background
        truth = objects_2d(shift=4 * z)[1]
        assert widget.add_point(layer.data_to_world([z, *centroid(truth == k)]))
        assert widget.commit().label_ids
        labels = viewer.layers["SAM labels"]
        assert iou(labels.data[z] == labels.data[z].max(), truth == k) >= 0.95, (z, k)
    assert (labels.data[2] == 0).all()  # untouched slice
    calls = model.encode_calls
    viewer.dims.set_point(0, layer.data_to_world([0, 0, 0])[0])
    assert widget.segmenter.embedding_ready and model.encode_calls == calls  # cached


def test_time_series_of_stacks(viewer, make_widget):
    img, truth = objects_2d()
    data = np.zeros((2, 3, *img.shape), np.uint16)
    data[1, 2] = img.astype(np.uint16) * 100
    layer = viewer.add_image(data, name="tzyx", contrast_limits=(0, 25500))
    widget = make_widget(OracleSam(image_size=256))
    viewer.dims.set_point(0, 1)
    viewer.dims.set_point(1, 2)
    widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world([1, 2, *centroid(truth == 2)]))
    widget.commit()
    labels = viewer.layers["SAM labels"].data
    assert iou(labels[1, 2] == 1, truth == 2) >= 0.95 and labels[0].max() == 0


def test_rgb_image_resized_by_the_model(viewer, make_widget):
    """(320, 512, 3) image into a 1024 model: the resize path, with x/y asymmetric."""
    _, truth = objects_2d(zoom=2)
    colours = {1: (200, 20, 20), 2: (20, 200, 200), 3: (250, 250, 100)}  # distinct gray means
    rgb = np.zeros((*truth.shape, 3), np.uint8)
    for k, c in colours.items():
        rgb[truth == k] = c
    layer = viewer.add_image(rgb, rgb=True, scale=(1.5, 1.5), name="rgb")
    widget = make_widget(OracleSam(image_size=1024))
    widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world(centroid(truth == 2)))
    widget.commit()
    assert iou(viewer.layers["SAM labels"].data == 1, truth == 2) >= 0.95


def test_boxes_give_several_objects_in_one_undoable_commit(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="img")
    widget = make_widget(OracleSam(image_size=256))
    widget.encode_current_slice(wait=True)
    for k in (1, 3):
        rows, cols = np.nonzero(truth == k)
        widget.add_box(layer.data_to_world([rows.min() - 3, cols.min() - 3]), layer.data_to_world([rows.max() + 3, cols.max() + 3]))
    assert widget.current_masks.shape == (2, 160, 256)
    assert widget.commit().label_ids == [1, 2]
    labels = viewer.layers["SAM labels"]
    assert iou(labels.data == 1, truth == 1) >= 0.95 and iou(labels.data == 2, truth == 3) >= 0.95
    labels.undo()  # one commit, one undo step
    assert labels.data.max() == 0


def test_existing_labels_are_kept_unless_overwrite_is_on(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="img")
    existing = np.zeros(img.shape, np.uint16)
    existing[30:50, 30:60] = 5  # covers part of object 1
    target = viewer.add_labels(existing.copy(), name="mine")
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(target)
    widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world(centroid(truth == 1) + [20, 0]))
    result = widget.commit()
    assert result.label_ids == [6] and result.skipped == [600]  # next free id
    assert (target.data[30:50, 30:60] == 5).all()
    widget.set_overwrite(True)
    widget.add_point(layer.data_to_world(centroid(truth == 1) + [20, 0]))
    widget.commit()
    assert (target.data[30:50, 30:60] != 5).all()
    target.undo()
    assert (target.data[30:50, 30:60] == 5).all()


def test_refine_an_existing_label_with_mask_input(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="img")
    rough = np.zeros(img.shape, np.uint8)
    rough[20:75, 20:50] = 4  # left part of object 1 only
    rough[0:5, 0:5] = 4  # a stray bit outside it
    target = viewer.add_labels(rough, name="rough")
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(target)
    widget.encode_current_slice(wait=True)
    assert widget.pick_label_at(layer.data_to_world([30, 30]))
    assert widget.segmenter.refine_id == 4
    widget.add_point(layer.data_to_world([40, 80]))  # right part of object 1
    assert widget.commit().label_ids == [4]
    assert iou(target.data == 4, truth == 1) >= 0.95


def test_points_outside_the_image_and_3d_view_are_explained(viewer, make_widget):
    img, _ = objects_2d()
    layer = viewer.add_image(img, name="img", translate=(100, 100))
    widget = make_widget(OracleSam(image_size=256))
    widget.encode_current_slice(wait=True)
    assert not widget.add_point((0.0, 0.0))
    assert "outside the image" in widget.status
    points = viewer.layers["SAM points"]
    points.add(np.asarray(points.world_to_data([5.0, 5.0]))[None])  # as a click outside would
    assert "ignored 1 prompt(s) outside" in widget.status and widget.current_masks is None
    viewer.dims.ndisplay = 3
    assert "2D" in widget.status
    viewer.dims.ndisplay = 2


def test_candidates_best_first_then_cycle(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="img")
    widget = make_widget(OracleSam(image_size=256))
    widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world(centroid(truth == 2)))
    best = widget.current_masks[0]
    assert iou(best, truth == 2) >= 0.95 and "IoU 0.90" in widget.status
    assert widget.next_candidate() == 1  # dilated (0.6)
    assert widget.current_masks[0].sum() > best.sum()
    widget.next_candidate()  # eroded (0.5)
    assert widget.current_masks[0].sum() < best.sum()
    widget.toggle_polarity()
    assert not widget.segmenter.positive
    widget.add_point(layer.data_to_world(centroid(truth == 1)))  # negative, elsewhere
    assert widget.segmenter.prediction.num_candidates == 1  # several points: one mask
    widget.clear()
    assert widget.current_masks is None and len(viewer.layers["SAM points"].data) == 0


def test_keys_are_bound_to_the_viewer(viewer, make_widget):
    from app_model.types import KeyBinding

    widget = make_widget(OracleSam(image_size=256))
    viewer.add_image(objects_2d()[0])
    bound = {str(k): f for k, f in viewer.keymap.items()}
    assert {"N", "K"} <= set(bound) and any("Enter" in k for k in bound)
    viewer.keymap[KeyBinding.from_str("N")](viewer)
    assert not widget.segmenter.positive
    widget.cleanup()
    assert KeyBinding.from_str("N") not in viewer.keymap


def test_gui_stays_responsive_while_encoding(viewer, make_widget, qtbot):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="img")
    widget = make_widget()
    qtbot.wait(200)  # the new layers' first draw (shader builds, seconds on llvmpipe) is not the encode's
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget.set_model(SlowOracle(1.5, image_size=256))  # starts encoding in the background
    assert widget.segmenter.encoding
    widget.add_point(layer.data_to_world(centroid(truth == 3)))  # placed while encoding
    assert widget.current_masks is None and "encoding" in widget.status
    qtbot.waitUntil(lambda: widget.current_masks is not None, timeout=15000)
    timer.stop()
    assert iou(widget.current_masks[0], truth == 3) >= 0.95  # prompt applied once ready
    gaps = np.diff(ticks)
    assert len(ticks) >= 10 and gaps.max() < 0.5, (len(ticks), gaps.max())  # the event loop kept running


def test_stale_encoding_is_never_applied_to_another_slice(viewer, make_widget, qtbot):
    stack = np.stack([objects_2d(shift=6 * z)[0] for z in range(3)])
    layer = viewer.add_image(stack, name="stack")
    viewer.dims.set_point(0, 0)
    model = SlowOracle(0.8, image_size=256)
    widget = make_widget(model)  # encodes z=0 in the background
    assert widget.segmenter.encoding
    viewer.dims.set_point(0, 2)  # move on before it finishes
    truth = objects_2d(shift=12)[1]
    widget.add_point(layer.data_to_world([2, *centroid(truth == 2)]))
    qtbot.waitUntil(lambda: widget.current_masks is not None, timeout=15000)
    assert iou(widget.current_masks[0], truth == 2) >= 0.95  # decoded on z=2's embedding
    assert model.encode_calls == 2 and widget.session.predictor.get_embedding() is widget.session.cache.get(widget.segmenter.encoder.current_key())
    assert {k.index for k in widget.session.cache.keys()} == {(0, -1, -1), (2, -1, -1)}


def test_tiny_sam_plumbing(viewer, make_widget, tiny_sam):
    rng = np.random.default_rng(0)
    layer = viewer.add_image(rng.integers(0, 4000, (2, 50, 80)).astype(np.uint16), name="noise")
    viewer.dims.set_point(0, 1)
    widget = make_widget(tiny_sam)
    assert widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world([1, 25, 40]))
    assert widget.current_masks.shape == (1, 50, 80)
    assert widget.segmenter.prediction.num_candidates == 3
    widget.add_box(layer.data_to_world([1, 5, 5])[1:], layer.data_to_world([1, 30, 60])[1:])
    assert widget.current_masks.shape == (1, 50, 80)  # one box + point: one object
    widget.add_box(layer.data_to_world([1, 32, 5])[1:], layer.data_to_world([1, 48, 70])[1:])
    masks = widget.current_masks
    assert masks.shape == (2, 50, 80)  # two boxes: two objects
    assert len(widget.commit().label_ids) == sum(bool(m.any()) for m in masks)


class CountingOracle(OracleSam):
    """The oracle counting its per-image decoder work (it counts decoder calls itself)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.image_side_calls = 0

    def image_side_cache(self, features):
        self.image_side_calls += 1
        return super().image_side_cache(features)


def test_first_click_after_an_encode_finds_the_decoder_work_done(viewer, make_widget, qtbot):
    """The per-image decoder work is done when the encode ends (background or wait=True),
    not on the first click."""
    from test_napari_first_hour import click

    stack = np.stack([objects_2d(shift=6 * z)[0] for z in range(2)])
    layer = viewer.add_image(stack, name="stack")
    viewer.dims.set_point(0, 0)
    model = CountingOracle(image_size=256)
    widget = make_widget(model)  # encodes z=0 in the worker
    qtbot.waitUntil(lambda: model.image_side_calls == 1, timeout=15000)
    viewer.reset_view()
    qtbot.wait(50)
    click(viewer, qtbot, layer.data_to_world([0, *centroid(objects_2d()[1] == 2)])[1:])
    assert iou(widget.current_masks[0], objects_2d()[1] == 2) >= 0.95
    assert model.image_side_calls == 1 and model.decode_calls == 1
    widget.clear()
    widget.segmenter.auto_encode = False
    viewer.dims.set_point(0, 1)
    assert widget.encode_current_slice(wait=True)
    assert model.image_side_calls == 2
    widget.add_point(layer.data_to_world([1, *centroid(objects_2d(shift=6)[1] == 3)]))
    assert iou(widget.current_masks[0], objects_2d(shift=6)[1] == 3) >= 0.95
    assert model.image_side_calls == 2 and model.decode_calls == 2


def test_a_click_is_decoded_on_the_press_once(viewer, make_widget, qtbot):
    """In the points layer's add mode the press already shows the preview of the point
    the release adds (decoded once); a press that turns into a drag (napari pans, no
    point) puts the previous preview back."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from test_napari_first_hour import canvas_point, click

    layer, truth, model, widget, points, native = _press_setup(viewer, make_widget, qtbot)
    preview = viewer.layers["SAM preview"]
    left, none = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    QTest.mousePress(native, left, none, pos)
    assert len(points.data) == 0 and model.decode_calls == 1  # held: no point yet, masks made
    assert iou(widget.current_masks[0], truth == 2) >= 0.95
    np.testing.assert_array_equal(preview.data > 0, widget.current_masks[0])
    QTest.mouseRelease(native, left, none, pos)
    assert len(points.data) == 1 and model.decode_calls == 1  # the release's point: the same masks
    np.testing.assert_allclose(points.data[0], layer.world_to_data(layer.data_to_world(centroid(truth == 2))),
                               atol=1.0)
    shown = widget.segmenter.prediction
    qtbot.wait(50)

    start = canvas_point(viewer, layer.data_to_world(centroid(truth == 3)))
    QTest.mousePress(native, left, none, start)
    assert model.decode_calls == 2 and len(points.data) == 1
    for step in range(1, 5):  # a drag: napari pans the view
        QTest.mouseMove(native, start + QPoint(10 * step, 0))
    QTest.mouseRelease(native, left, none, start + QPoint(40, 0))
    assert len(points.data) == 1 and widget.segmenter.prediction is shown
    assert iou(widget.current_masks[0], truth == 2) >= 0.95
    np.testing.assert_array_equal(preview.data > 0, widget.current_masks[0])
    qtbot.wait(50)
    click(viewer, qtbot, layer.data_to_world(centroid(truth == 2) + 3))  # same object, 2 points
    assert len(points.data) == 2 and model.decode_calls == 3
    widget.cleanup()  # a closed widget no longer listens to presses
    assert not any(getattr(cb, "__self__", None) is widget.segmenter for cb in viewer.mouse_drag_callbacks)


def _press_setup(viewer, make_widget, qtbot):
    """A widget on objects_2d() encoded, the view reset: (layer, truth, model, widget,
    points layer, canvas widget)."""
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    model = CountingOracle(image_size=256)
    widget = make_widget(model, auto_encode=False)
    assert widget.encode_current_slice(wait=True)
    viewer.reset_view()
    qtbot.wait(50)
    return layer, truth, model, widget, viewer.layers["SAM points"], viewer.window._qt_viewer.canvas.native


def test_a_failed_decode_on_the_press_still_adds_the_point(viewer, make_widget, qtbot, monkeypatch):
    """A decode that raises on the press is reported on the status line; napari goes on
    and the release still adds the point (whose data event then decodes it)."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from test_napari_first_hour import canvas_point

    layer, truth, _model, widget, points, native = _press_setup(viewer, make_widget, qtbot)
    segmenter = widget.segmenter
    decode, failures = segmenter._decode, []

    def fails_once(*args):
        if not failures:
            failures.append(1)
            raise RuntimeError("out of memory")
        return decode(*args)

    monkeypatch.setattr(segmenter, "_decode", fails_once)
    left, none = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    QTest.mousePress(native, left, none, pos)
    assert failures and "RuntimeError: out of memory" in segmenter.last_status
    assert len(points.data) == 0 and segmenter.prediction is None
    QTest.mouseRelease(native, left, none, pos)
    assert len(points.data) == 1
    assert iou(widget.current_masks[0], truth == 2) >= 0.95


def test_a_drag_keeps_a_preview_updated_during_the_hold(viewer, make_widget, qtbot):
    """A press that becomes a drag puts the previous preview back only if the press's own
    masks are still shown: a preview made while the button was held (an encode ended, a
    setting changed) is kept, not replaced by the older one."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from test_napari_first_hour import canvas_point, click

    layer, truth, _model, widget, points, native = _press_setup(viewer, make_widget, qtbot)
    segmenter = widget.segmenter
    click(viewer, qtbot, layer.data_to_world(centroid(truth == 2)))
    before = segmenter.prediction
    assert len(points.data) == 1 and before.num_candidates == 3
    left, none = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    start = canvas_point(viewer, layer.data_to_world(centroid(truth == 3)))
    QTest.mousePress(native, left, none, start)
    assert segmenter.prediction is not before  # the press's own masks
    segmenter.multimask = False  # during the hold: the shown prompts decoded anew
    segmenter.update_preview()
    updated = segmenter.prediction
    assert updated.num_candidates == 1
    for step in range(1, 5):  # a drag: napari pans, no point
        QTest.mouseMove(native, start + QPoint(10 * step, 0))
    QTest.mouseRelease(native, left, none, start + QPoint(40, 0))
    assert len(points.data) == 1 and segmenter.prediction is updated
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data > 0, widget.current_masks[0])


def test_a_decode_failing_on_the_press_and_the_release_is_reported_not_raised(viewer, make_widget, qtbot,
                                                                              monkeypatch):
    """The point napari adds on the release decodes again (through the points layer's data
    event); when that decode fails too, the status line says why and nothing is raised
    into napari's event handling (which would show a traceback)."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from test_napari_first_hour import canvas_point

    from test_napari_first_hour import click

    layer, truth, _model, widget, points, native = _press_setup(viewer, make_widget, qtbot)
    segmenter = widget.segmenter
    segmenter.decode_ahead = False  # (every decode through _decode)
    click(viewer, qtbot, layer.data_to_world(centroid(truth == 3)))  # a first point, decoded
    assert iou(widget.current_masks[0], truth == 3) >= 0.95

    def fails(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(segmenter, "_decode", fails)
    left, none = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    QTest.mousePress(native, left, none, pos)
    QTest.mouseRelease(native, left, none, pos)
    assert len(points.data) == 2 and segmenter.prediction is None
    assert "could not segment" in segmenter.last_status and "RuntimeError: out of memory" in segmenter.last_status
    # the first point's mask is not left shown, nor committed as if it were the two points'
    assert not viewer.layers["SAM preview"].data.any()
    widget.commit()
    assert "SAM labels" not in [lay.name for lay in viewer.layers] or not viewer.layers["SAM labels"].data.any()
    monkeypatch.undo()
    segmenter.update_preview()  # a later prompt change decodes normally again
    assert widget.current_masks is not None
