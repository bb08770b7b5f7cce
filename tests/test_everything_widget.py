"""The Segment Everything widget in a headless napari viewer, with the oracle model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import dock
from napari_sam._napari.everything_widget import SegmentEverythingWidget
from napari_sam._napari.geometry import current_plane
from napari_sam._napari.session import session_for
from test_automatic_oracle import FastOracle, draw_objects, iou

pytestmark = pytest.mark.gui

FAST = dict(points_per_side=16, stability_score_thresh=0.8)


class SlowDecoder(FastOracle):
    """The oracle with a decoder that takes a while per batch (a long run to cancel)."""

    def decode(self, *args, **kwargs):
        time.sleep(0.2)
        return super().decode(*args, **kwargs)


def make_widget(viewer, model):
    """The Segment Everything widget docked as the Plugins menu does, with ``model`` in
    the viewer's session."""
    widget = dock(viewer, "Segment Everything")
    session_for(viewer).set_model(model)
    widget.set_params(**FAST)
    return widget


def majority_ids(labels, truth):
    ids = []
    for t in truth:
        values, counts = np.unique(labels[t], return_counts=True)
        assert counts.max() >= 0.9 * t.sum(), "an object is split or missed"
        ids.append(int(values[np.argmax(counts)]))
    return ids


def test_slice_into_new_then_existing_layer_with_undo(viewer):
    image, truth = draw_objects((220, 256), grid=(3, 3), seed=3, radius=(12, 32))
    layer = viewer.add_image(image, scale=(0.5, 2.0), translate=(10, -4))
    oracle = FastOracle(image_size=256)
    widget = make_widget(viewer, oracle)
    embedding = widget.session.embedding(layer, current_plane(viewer.dims, layer))  # as the interactive widget
    calls = oracle.encode_calls

    labels = widget.run(scope="slice", wait=True)
    assert oracle.encode_calls == calls and embedding is not None  # the session's embedding is reused
    assert labels.name == "SAM everything" and labels.data.shape == image.shape
    np.testing.assert_allclose(labels.scale, layer.scale)
    np.testing.assert_allclose(labels.translate, layer.translate)
    ids = majority_ids(labels.data, truth)
    assert 0 not in ids and len(set(ids)) == len(truth)
    for t, i in zip(truth, ids):
        assert iou(labels.data == i, t) >= 0.9
    assert "objects written" in widget.status

    # again into the same layer, where one object was erased: existing labels stay, the
    # erased object comes back with a new id above the maximum, in one undo step
    labels.data[labels.data == ids[0]] = 0
    before = labels.data.copy()
    widget.set_labels_layer(labels)
    widget.run(scope="slice", wait=True)
    assert len(viewer.layers) == 2
    np.testing.assert_array_equal(labels.data[before > 0], before[before > 0])  # not overwritten
    assert labels.data.max() > before.max()
    assert iou(labels.data > before.max(), truth[0]) >= 0.9
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)


def test_stack_links_objects_through_z_and_dock(viewer):
    z, y, x = np.mgrid[0:5, 0:110, 0:128]
    truth = [
        (z - 2) ** 2 * 40 + (y - 40) ** 2 + (x - 40) ** 2 < 30**2,
        ((y - 75) ** 2 + (x - 95) ** 2 < 22**2) & (z >= 1),
    ]
    stack = np.zeros(z.shape, np.uint16)
    for k, t in enumerate(truth):
        stack[t] = 1000 * (k + 1)
    layer = viewer.add_image(stack, contrast_limits=(0, 2550))
    viewer.dims.set_point(0, 2)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Everything")
    assert isinstance(widget, SegmentEverythingWidget)
    widget.session.set_model(FastOracle(image_size=128))
    widget.set_params(points_per_side=8, stability_score_thresh=0.7)
    widget.set_image_layer(layer)
    labels = widget.run(scope="stack", wait=True)
    assert labels.data.shape == stack.shape
    ids = majority_ids(labels.data, truth)
    assert len(set(ids)) == 2 and 0 not in ids
    assert len(widget.session.cache) == 5  # every slice's embedding went through the session cache


def test_cancel_leaves_existing_labels_untouched(viewer, qtbot):
    image, _ = draw_objects((220, 256), grid=(3, 3), seed=3, radius=(12, 32))
    viewer.add_image(image)
    existing = np.zeros(image.shape, np.int32)
    existing[5:30, 5:30] = 7
    labels = viewer.add_labels(existing.copy(), name="mine")
    widget = make_widget(viewer, SlowDecoder(image_size=256))
    widget.set_params(points_per_batch=8)
    widget.set_labels_layer(labels)
    steps = []
    worker = widget.run(scope="slice")
    worker.yielded.connect(steps.append)
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=20000)
    with qtbot.waitSignal(worker.finished, timeout=20000):
        widget.cancel()
    assert len(steps) < 10  # it really stopped early (32 batches in all)
    np.testing.assert_array_equal(labels.data, existing)
    assert [la.name for la in viewer.layers] == ["image", "mine"]
    assert "cancelled" in widget.status


def test_bad_input_gives_a_message_not_a_traceback(viewer):
    viewer.add_image(np.zeros((20, 30), np.uint8))
    widget = dock(viewer, "Segment Everything")
    assert widget.run(wait=True) is None and "load a model first" in widget.status
    widget.session.set_model(FastOracle(image_size=256))
    assert widget.run(scope="stack", wait=True) is None and "2D" in widget.status
    viewer.add_labels(np.zeros((5, 5), np.int32), name="small")
    widget.set_labels_layer(viewer.layers["small"])
    small = widget.run(scope="slice", wait=True)  # written where it is shown: its 5x5 corner
    assert small is viewer.layers["small"] and small.data.shape == (5, 5)
    with pytest.raises(ValueError, match="expected a parameter"):
        widget.set_params(points=3)
