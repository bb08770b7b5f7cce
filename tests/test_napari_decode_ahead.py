"""Decode ahead: the masks of a click prepared while the cursor rests on the canvas.

Real mouse events (QTest moves, presses, releases on the canvas of a docked widget). What a
user sees: after the cursor rested on an object, the press shows its masks without a decode
of its own; anything that makes the click's prompt differ from the rested one (another
place, a changed setting) decodes as before, so a wrong mask is never shown.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt
from qtpy.QtTest import QTest
from qtpy.QtWidgets import QCheckBox
from test_napari_first_hour import canvas_point
from test_napari_widget import _press_setup, centroid, iou

import napari_sam._napari.segmenter as segmenter_mod
from napari_sam.model.interrupt import raise_if_stopped

LEFT, NONE = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
THREAD_PREFIX = "napari-sam-decode-ahead"


@pytest.fixture
def decodes(monkeypatch):
    """Records each decode of the widget: ``calls`` (True: it ran on the GUI thread) and
    ``spans`` ((on GUI thread, start, end) perf_counter times, also of stopped ones).
    ``delay`` (seconds) slows every decode, as a big model on a slow CPU, in 10 ms stages
    with the decoder's stop check between them."""
    calls: list[bool] = []
    spans: list[tuple[bool, float, float]] = []
    original = segmenter_mod.decode_objects
    state = {"delay": 0.0}

    def record(*args, **kwargs):
        on_gui = threading.current_thread() is threading.main_thread()
        calls.append(on_gui)
        start = time.perf_counter()
        try:
            while time.perf_counter() - start < state["delay"]:
                time.sleep(0.01)
                raise_if_stopped()
            return original(*args, **kwargs)
        finally:
            spans.append((on_gui, start, time.perf_counter()))

    monkeypatch.setattr(segmenter_mod, "decode_objects", record)
    record.calls, record.spans, record.state = calls, spans, state
    return record


def setup(viewer, make_widget, qtbot):
    """:func:`_press_setup`, then the dock's layout left to settle (a canvas resized later
    would map the same screen point to another image pixel)."""
    made = _press_setup(viewer, make_widget, qtbot)
    qtbot.wait(300)
    viewer.reset_view()
    qtbot.wait(50)
    return made


def rest_on(native, qtbot, pos, ms=segmenter_mod.REST_MS + 250) -> None:
    """Move the cursor to ``pos`` and keep it there ``ms`` (events processed). The move
    starts 2 px away: Qt may deliver that first move on its own (a rest there, decoded)."""
    QTest.mouseMove(native, pos + QPoint(2, 2))  # (a move to where it already is sends no event)
    QTest.mouseMove(native, pos)
    qtbot.wait(ms)


def test_a_click_where_the_cursor_rested_shows_masks_decoded_before_the_press(viewer, make_widget, qtbot, decodes):
    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    # the option off (its check box): the cursor's rest decodes nothing, the press does
    option = next(c for c in widget.findChildren(QCheckBox) if c.text().startswith("Prepare the mask under"))
    assert option.isChecked() and option.toolTip()
    option.setChecked(False)
    rest_on(native, qtbot, pos)
    assert decodes.calls == []
    QTest.mousePress(native, LEFT, NONE, pos)
    QTest.mouseRelease(native, LEFT, NONE, pos)
    assert decodes.calls == [True]
    decoded_on_press = widget.current_masks.copy()
    widget.clear()

    option.setChecked(True)
    rest_on(native, qtbot, pos)
    rested = decodes.calls[1:]
    assert rested and not any(rested)  # decoded in the background while the cursor rested
    assert widget.current_masks is None  # nothing shown before the click
    QTest.mousePress(native, LEFT, NONE, pos)
    assert decodes.calls[1:] == rested  # the press decoded nothing itself
    np.testing.assert_array_equal(widget.current_masks, decoded_on_press)  # the very same masks
    assert iou(widget.current_masks[0], truth == 2) >= 0.95
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data > 0, widget.current_masks[0])
    QTest.mouseRelease(native, LEFT, NONE, pos)
    assert len(points.data) == 1 and decodes.calls[1:] == rested


def test_a_click_elsewhere_or_after_a_change_decodes_its_own_prompt(viewer, make_widget, qtbot, decodes):
    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    segmenter = widget.segmenter
    at_2 = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    at_3 = canvas_point(viewer, layer.data_to_world(centroid(truth == 3)))
    rest_on(native, qtbot, at_2)
    assert decodes.calls and not any(decodes.calls)
    QTest.mousePress(native, LEFT, NONE, at_3)  # no move event: the cursor "jumped"
    QTest.mouseRelease(native, LEFT, NONE, at_3)
    assert decodes.calls[-1] and sum(decodes.calls) == 1  # one decode of its own, on the press
    assert iou(widget.current_masks[0], truth == 3) >= 0.95 and len(points.data) == 1

    widget.clear()
    before = len(decodes.calls)
    rest_on(native, qtbot, at_2)
    assert len(decodes.calls) > before and not any(decodes.calls[before:])
    segmenter.multimask = False  # a setting changed after the rest: the rested masks are stale
    QTest.mousePress(native, LEFT, NONE, at_2)
    QTest.mouseRelease(native, LEFT, NONE, at_2)
    assert decodes.calls[-1] and sum(decodes.calls) == 2
    assert segmenter.prediction.num_candidates == 1 and iou(widget.current_masks[0], truth == 2) >= 0.95


def test_the_cursor_resting_off_the_image_or_moving_decodes_nothing(viewer, make_widget, qtbot, decodes):
    layer, truth, _model, widget, _points, native = setup(viewer, make_widget, qtbot)
    outside = canvas_point(viewer, layer.data_to_world(np.array([-40.0, -40.0])))
    rest_on(native, qtbot, outside)
    assert decodes.calls == []
    start = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    for step in range(8):  # the cursor moves onto the image, then rests: moves within 10 ms
        QTest.mouseMove(native, start + QPoint(2 * step, 0))  # of the last are dropped by vispy
    end = start + QPoint(14, 0)
    qtbot.wait(segmenter_mod.REST_MS + 250)
    rested = list(decodes.calls)
    assert rested and not any(rested)
    QTest.mousePress(native, LEFT, NONE, end)
    QTest.mouseRelease(native, LEFT, NONE, end)
    assert decodes.calls == rested and iou(widget.current_masks[0], truth == 2) >= 0.95


def test_a_press_elsewhere_stops_a_slow_background_decode_then_decodes_its_own(viewer, make_widget, qtbot,
                                                                                decodes):
    """The press does not wait for the whole guess (1 s here), nor decode beside it: the
    guess stops at its next stage, then the press decodes alone."""
    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    decodes.state["delay"] = 1.0
    at_2 = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    at_3 = canvas_point(viewer, layer.data_to_world(centroid(truth == 3)))
    rest_on(native, qtbot, at_2, ms=segmenter_mod.REST_MS + 150)  # still decoding
    assert decodes.calls and not any(decodes.calls)
    decodes.state["delay"] = 0.0
    pressed = time.perf_counter()
    QTest.mousePress(native, LEFT, NONE, at_3)
    QTest.mouseRelease(native, LEFT, NONE, at_3)
    assert decodes.calls[-1] and sum(decodes.calls) == 1
    (gui,) = [span for span in decodes.spans if span[0]]
    background_end = max(end for on_gui, _, end in decodes.spans if not on_gui)
    assert background_end <= gui[1]  # never both at once
    assert background_end - pressed < 0.5  # stopped, not run to its end    assert iou(widget.current_masks[0], truth == 3) >= 0.95 and len(points.data) == 1


def test_a_quick_click_after_a_move_leaves_no_background_decode(viewer, make_widget, qtbot, decodes):
    """A press within REST_MS of the last move ends the rest: no guess is decoded after
    the click (it would hold the cores when the next click comes)."""
    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    QTest.mouseMove(native, pos + QPoint(30, 0))
    qtbot.wait(1)
    QTest.mouseMove(native, pos)  # (napari may deliver this move only after the click)
    QTest.mousePress(native, LEFT, NONE, pos)
    QTest.mouseRelease(native, LEFT, NONE, pos)
    assert len(points.data) == 1 and iou(widget.current_masks[0], truth == 2) >= 0.95
    made = len(decodes.calls)
    qtbot.wait(segmenter_mod.REST_MS + 250)
    assert len(decodes.calls) == made


def test_a_changed_polarity_or_a_cursor_off_the_canvas_decodes_nothing_stale(viewer, make_widget, qtbot, decodes):
    from qtpy.QtCore import QEvent, QPointF
    from qtpy.QtGui import QEnterEvent
    from qtpy.QtWidgets import QApplication

    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    segmenter = widget.segmenter
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    rest_on(native, qtbot, pos)
    assert decodes.calls and not any(decodes.calls)
    segmenter.positive = False  # (the N key) after the rest: the rested guess was a positive point
    QTest.mousePress(native, LEFT, NONE, pos)
    QTest.mouseRelease(native, LEFT, NONE, pos)
    assert decodes.calls[-1] and sum(decodes.calls) == 1
    assert list(points.features["positive"]) == [False]

    widget.clear()
    made = len(decodes.calls)
    QTest.mouseMove(native, pos + QPoint(3, 3))
    QApplication.sendEvent(native, QEvent(QEvent.Type.Leave))  # it left the canvas at once
    qtbot.wait(segmenter_mod.REST_MS + 250)
    assert len(decodes.calls) == made
    QApplication.sendEvent(native, QEnterEvent(QPointF(pos), QPointF(pos), QPointF(native.mapToGlobal(pos))))
    rest_on(native, qtbot, pos)  # back on it: decoded ahead again
    assert len(decodes.calls) > made


def test_the_press_draws_the_preview_before_napari_handles_the_release(viewer, make_widget, qtbot, decodes):
    """On a quick click (press and release queued together) the preview is drawn before
    napari adds the point on the release (tens of ms of Points handling)."""
    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    events = []
    canvas = viewer.window._qt_viewer.canvas
    canvas._scene_canvas.events.draw.connect(lambda _e: events.append("draw"), position="last")
    points.events.data.connect(lambda e: events.append("point") if str(e.action).endswith("added") else None)
    pos = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    QTest.mousePress(native, LEFT, NONE, pos)
    QTest.mouseRelease(native, LEFT, NONE, pos)
    assert "point" in events and "draw" in events[: events.index("point")]
    assert iou(widget.current_masks[0], truth == 2) >= 0.95


def test_closing_the_widget_during_a_background_decode_ends_its_thread(viewer, make_widget, qtbot, decodes):
    from conftest import close

    layer, truth, _model, widget, _points, native = setup(viewer, make_widget, qtbot)
    decodes.state["delay"] = 0.4
    rest_on(native, qtbot, canvas_point(viewer, layer.data_to_world(centroid(truth == 2))),
            ms=segmenter_mod.REST_MS + 100)
    rested = list(decodes.calls)
    assert rested and not any(rested)
    assert any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    close(viewer, widget)
    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    QTest.mouseMove(native, QPoint(5, 5))  # a closed widget no longer listens to moves
    qtbot.wait(segmenter_mod.REST_MS + 100)
    assert decodes.calls == rested
