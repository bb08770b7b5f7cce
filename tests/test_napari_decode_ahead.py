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

LEFT, NONE = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
THREAD_PREFIX = "napari-sam-decode-ahead"


@pytest.fixture
def decodes(monkeypatch):
    """Records each decode of the widget: True when it ran on the GUI thread. ``delay``
    (seconds) slows every decode, as a big model on a slow CPU."""
    calls: list[bool] = []
    original = segmenter_mod.decode_objects
    state = {"delay": 0.0}

    def record(*args, **kwargs):
        calls.append(threading.current_thread() is threading.main_thread())
        time.sleep(state["delay"])
        return original(*args, **kwargs)

    monkeypatch.setattr(segmenter_mod, "decode_objects", record)
    record.calls, record.state = calls, state
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
    option = next(c for c in widget.findChildren(QCheckBox) if c.text().startswith("Decode under"))
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
    for step in range(8):  # the cursor moves onto the image, then rests
        QTest.mouseMove(native, start + QPoint(2 * step, 0))
    end = start + QPoint(14, 0)
    rest_on(native, qtbot, end)  # (Qt under Xvfb may drop the last of quick moves)
    rested = list(decodes.calls)
    assert rested and not any(rested)
    QTest.mousePress(native, LEFT, NONE, end)
    QTest.mouseRelease(native, LEFT, NONE, end)
    assert decodes.calls == rested and iou(widget.current_masks[0], truth == 2) >= 0.95


def test_a_press_during_a_slow_background_decode_waits_for_it_then_decodes_its_own(viewer, make_widget, qtbot,
                                                                                   decodes):
    layer, truth, _model, widget, points, native = setup(viewer, make_widget, qtbot)
    decodes.state["delay"] = 0.4
    at_2 = canvas_point(viewer, layer.data_to_world(centroid(truth == 2)))
    at_3 = canvas_point(viewer, layer.data_to_world(centroid(truth == 3)))
    rest_on(native, qtbot, at_2, ms=segmenter_mod.REST_MS + 100)  # still decoding
    assert decodes.calls and not any(decodes.calls)
    QTest.mousePress(native, LEFT, NONE, at_3)
    QTest.mouseRelease(native, LEFT, NONE, at_3)
    assert decodes.calls[-1] and sum(decodes.calls) == 1
    assert iou(widget.current_masks[0], truth == 3) >= 0.95 and len(points.data) == 1


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
