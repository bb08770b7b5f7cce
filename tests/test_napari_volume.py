"""Volume features of the Segment Anything widget in a headless napari viewer: propagate
through a stack (one label id, one undo step, cancel writes nothing) and the embedding
store (precomputed once, reopened with zero encoder calls). Oracle model (tests/oracle.py).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from oracle import OracleSam

pytestmark = pytest.mark.gui

NZ, MID = 21, 10


def ellipsoid():
    """(21, 96, 128) uint8 stack: one ellipsoid of intensity 150, and its truth."""
    zz, yy, xx = np.mgrid[:NZ, :96, :128]
    truth = ((zz - MID) / 9.5) ** 2 + ((yy - 48) / 34.0) ** 2 + ((xx - 64) / 44.0) ** 2 < 1
    return np.where(truth, 150, 0).astype(np.uint8), truth


def iou(a, b) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


class SlowOracle(OracleSam):
    def encode(self, x):
        time.sleep(0.05)
        return super().encode(x)


def prompt_middle(viewer, widget, layer):
    widget.set_image_layer(layer)
    viewer.dims.set_current_step(0, MID)
    assert widget.encode_current_slice(wait=True)
    assert widget.add_point((48.0, 64.0))
    assert widget.current_masks is not None and widget.current_masks.shape[0] == 1


def test_propagate_commits_one_label_one_undo(viewer, make_widget):
    vol, truth = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = make_widget(OracleSam(image_size=256))
    prompt_middle(viewer, widget, layer)
    result = widget.propagate(wait=True)
    assert result is not None and result.first < MID < result.last
    labels = viewer.layers["SAM labels"]
    ids = np.unique(labels.data)
    assert list(ids) == [0, 1]
    assert iou(labels.data == 1, truth) >= 0.9
    assert "slices" in widget.status and "stops" in widget.status
    labels.undo()
    assert not labels.data.any()


def test_propagate_worker_respects_range_and_no_overwrite(viewer, make_widget, qtbot):
    vol, truth = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = make_widget(OracleSam(image_size=256))
    labels = viewer.add_labels(np.zeros(vol.shape, np.uint32), name="mine")
    labels.data[MID + 2, 40:56, 50:70] = 7  # an existing object inside the ellipsoid
    widget.set_labels_layer(labels)
    widget.volume.set_stop_range(MID - 3, MID + 3)
    prompt_middle(viewer, widget, layer)
    worker = widget.propagate(wait=False)
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.volume.running, timeout=20000)
    new = labels.data == 8
    assert np.flatnonzero(new.any(axis=(1, 2))).tolist() == list(range(MID - 3, MID + 4))
    assert (labels.data[MID + 2, 40:56, 50:70] == 7).all()  # no-overwrite rule
    assert "range" in widget.status


def test_cancel_leaves_labels_untouched(viewer, make_widget, qtbot):
    vol, _ = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = make_widget(SlowOracle(image_size=256))
    labels = viewer.add_labels(np.zeros(vol.shape, np.uint32), name="mine")
    labels.data[0, :5, :5] = 3
    before = labels.data.copy()
    widget.set_labels_layer(labels)
    prompt_middle(viewer, widget, layer)
    assert widget.propagate(wait=False) is not None
    widget.volume.cancel()
    qtbot.waitUntil(lambda: not widget.volume.running, timeout=20000)
    np.testing.assert_array_equal(labels.data, before)
    assert "cancelled" in widget.status


def test_store_precompute_then_reopen_costs_no_encoder_call(viewer, make_widget, qtbot, tmp_path):
    vol, truth = ellipsoid()
    path = tmp_path / "stack.sam.zarr"
    layer = viewer.add_image(vol, name="stack")
    first = make_widget(OracleSam(image_size=256), auto_encode=False)
    first.set_image_layer(layer)
    viewer.dims.set_current_step(0, MID)
    assert first.open_store(path, wait=False) is not None
    qtbot.waitUntil(lambda: not first.volume.running, timeout=20000)
    assert first.session.store_for(layer) is not None
    assert first.precompute_store(wait=False) is not None
    qtbot.waitUntil(lambda: not first.volume.running, timeout=20000)
    store = first.session.store_for(layer)
    assert store.ready.all()
    assert f"{NZ}/{NZ} slices ready" in first.volume._ready.text()
    first.cleanup()

    viewer.layers.clear()  # a new layer and a new session on the same data
    layer = viewer.add_image(vol.copy(), name="stack again")
    oracle = OracleSam(image_size=256)
    second = make_widget(oracle, auto_encode=False)
    second.set_image_layer(layer)
    viewer.dims.set_current_step(0, MID)
    store = second.open_store(path, wait=True)
    assert store.status.state == "reused" and store.ready.all()
    prompt_middle(viewer, second, layer)
    assert second.propagate(wait=True) is not None
    assert iou(viewer.layers["SAM labels"].data > 0, truth) >= 0.9
    assert oracle.encode_calls == 0


def test_preview_after_transposing_a_square_plane_keeps_no_stale_pixels(viewer, qtbot):
    """The same square plane shown with swapped axes keeps the preview's data shape; the
    box drawn before the swap belongs to the other orientation, so drawing the next
    preview clears the whole plane, not that box read the other way round."""
    from napari_sam._napari.geometry import current_plane
    from napari_sam._napari.prompt_layers import (
        ensure_preview_layer,
        preview_plane_view,
        show_preview,
    )

    layer = viewer.add_image(np.zeros((5, 64, 64), np.uint8), name="cube")
    plane = current_plane(viewer.dims, layer)
    preview = ensure_preview_layer(viewer, layer, plane)
    show_preview(preview, plane, np.ones((10, 20), np.uint8), (5, 30))  # rows 5:15, cols 30:50
    viewer.dims.order = (0, 2, 1)  # transposed: x as rows, y as columns
    qtbot.wait(50)
    swapped = current_plane(viewer.dims, layer)
    assert tuple(swapped.axes_rc) == (2, 1)
    preview = ensure_preview_layer(viewer, layer, swapped)
    show_preview(preview, swapped, np.full((8, 8), 2, np.uint8), (40, 40))
    qtbot.wait(50)
    expected = np.zeros((64, 64), np.uint8)
    expected[40:48, 40:48] = 2
    np.testing.assert_array_equal(preview_plane_view(preview, swapped), expected)
    shown = preview._slice.image  # and on screen: the displayed colours are the data's
    np.testing.assert_array_equal(shown.view, preview._raw_to_displayed(shown.raw))


def test_preview_never_paints_a_displayed_slice_that_is_not_its_data(viewer, qtbot):
    """The in-place redraw paints from napari's displayed slice only while that slice is
    a view of the layer's current data; a stale one (a view of other memory) makes it
    refresh in full, so the screen shows the new data."""
    import dataclasses

    from napari_sam._napari.geometry import current_plane
    from napari_sam._napari.prompt_layers import ensure_preview_layer, show_preview

    layer = viewer.add_image(np.zeros((5, 64, 64), np.uint8), name="cube")
    plane = current_plane(viewer.dims, layer)
    preview = ensure_preview_layer(viewer, layer, plane)
    qtbot.wait(50)
    in_place = []
    preview.events.labels_update.connect(lambda event: in_place.append(event.offset))
    show_preview(preview, plane, np.ones((10, 20), np.uint8), (5, 30))
    assert len(in_place) == 1  # the normal case: drawn in place
    shown = preview._slice.image
    stale = np.zeros_like(preview.data)[0]  # a view, but of memory that is not the layer's
    state = preview._slicing_state  # as if a slice of other data were still displayed
    state._slice = dataclasses.replace(state._slice, image=dataclasses.replace(shown, raw=stale))
    show_preview(preview, plane, np.full((8, 8), 2, np.uint8), (40, 40))
    assert len(in_place) == 1  # not in place: a full refresh
    shown = preview._slice.image
    assert np.shares_memory(shown.raw, preview.data)
    np.testing.assert_array_equal(shown.view, preview._raw_to_displayed(shown.raw))
    assert (shown.raw[40:48, 40:48] == 2).all() and not shown.raw[:40].any()
