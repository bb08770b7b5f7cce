"""Cancel acts inside a long step of a widget's job, not only between steps.

A job's step can be long: an encoder pass (vit_b: 12 blocks of ~0.5 s on a CPU) inside
segment-everything, a slice encode, or a propagation step. The job runner runs each step
under ``stop_when(cancel.is_set)``: Cancel stops the pass after the encoder block in
progress, the job ends as cancelled (never as an error) and nothing is written.

The encoder is a small real ViT (random weights); a gate holds its block ``GATE_BLOCK``
until the test has pressed Cancel, and the blocks that ran are counted, so nothing here is
timed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from conftest import dock
from napari_sam._napari.session import session_for
from napari_sam.model import SamConfig, ViTConfig, build_model

pytestmark = pytest.mark.gui

DEPTH, GATE_BLOCK = 6, 1
CONFIG = SamConfig("vit_b", "vit", ViTConfig(embed_dim=32, depth=DEPTH, num_heads=2,
                                             global_attn_indexes=(2, 5)), img_size=128)


class GatedEncoder:
    """Counts the encoder blocks that ran; the first pass through block ``GATE_BLOCK``
    waits (in the worker thread) until :meth:`release`, so Cancel lands mid-encode."""

    def __init__(self, model) -> None:
        self.blocks_run, self.passes = 0, 0
        self.reached, self._released = threading.Event(), threading.Event()
        for i, block in enumerate(model.image_encoder.blocks):
            block.register_forward_hook(lambda *_a, i=i: self._after(i))

    def _after(self, index: int) -> None:
        self.blocks_run += 1
        if index == 0:
            self.passes += 1
        if index == GATE_BLOCK and not self.reached.is_set():
            self.reached.set()
            self._released.wait(20)

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def gated_model():
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    return model, GatedEncoder(model)


def blob_image(shape=(100, 120)) -> np.ndarray:
    img = np.zeros(shape, np.uint8)
    img[30:70, 40:90] = 200
    return img


def cancel_mid_encode(qtbot, gate: GatedEncoder, press_cancel, running) -> None:
    """Wait for the gated block, press Cancel, let the block finish, wait for the job's end."""
    qtbot.waitUntil(gate.reached.is_set, timeout=20000)
    press_cancel()
    gate.release()
    qtbot.waitUntil(lambda: not running(), timeout=20000)


def test_cancel_of_segment_everything_stops_inside_the_encode(viewer, qtbot, gated_model):
    model, gate = gated_model
    viewer.add_image(blob_image(), name="image")
    existing = np.zeros((100, 120), np.int32)
    existing[5:20, 5:20] = 4
    labels = viewer.add_labels(existing.copy(), name="mine")
    widget = dock(viewer, "Segment Everything")
    session_for(viewer).set_model(model)
    widget.set_labels_layer(labels)
    assert widget.run(scope="slice") is not None
    cancel_mid_encode(qtbot, gate, lambda: qtbot.mouseClick(widget._cancel_button, Qt.MouseButton.LeftButton),
                      lambda: widget.runner.running)
    assert gate.blocks_run == GATE_BLOCK + 1  # of DEPTH: stopped right after the block in progress
    np.testing.assert_array_equal(labels.data, existing)
    assert [layer.name for layer in viewer.layers] == ["image", "mine"]
    assert "cancelled" in widget.status and "failed" not in widget.status
    assert len(session_for(viewer).cache) == 0  # a stopped encode is never cached


def test_cancel_of_a_slice_encode_stops_it_without_restarting(viewer, qtbot, make_widget, gated_model):
    model, gate = gated_model
    layer = viewer.add_image(blob_image(), name="image")
    widget = make_widget(model)
    widget.set_image_layer(layer)  # starts the background encode of the shown slice
    cancel_mid_encode(qtbot, gate, widget.segmenter.cancel_encoding, lambda: widget.segmenter.encoding)
    qtbot.wait(100)  # a restarted encode would show now
    assert not widget.segmenter.encoding and gate.passes == 1  # stopped, and not started again
    assert gate.blocks_run == GATE_BLOCK + 1
    assert "stopped" in widget.status and "failed" not in widget.status
    assert not widget.segmenter.embedding_ready
    widget.encode_current_slice(wait=True)  # asked again: a whole encode
    assert widget.segmenter.embedding_ready and gate.blocks_run == GATE_BLOCK + 1 + DEPTH


def test_after_a_cancelled_encode_a_newly_shown_slice_still_encodes(viewer, qtbot, make_widget, gated_model):
    """Cancel stops the shown slice's encode; with auto-encode on, the slice the user moved
    to while it ran is encoded when the job ends, the stopped one is not."""
    model, gate = gated_model
    layer = viewer.add_image(np.stack([blob_image()] * 3), name="stack")
    viewer.dims.set_current_step(0, 0)  # napari shows the middle slice first
    widget = make_widget(model)
    widget.set_image_layer(layer)  # encodes slice 0 in the background
    qtbot.waitUntil(gate.reached.is_set, timeout=20000)
    stopped_key = widget.segmenter.encoder.current_key()
    viewer.dims.set_current_step(0, 2)  # moved on while slice 0 encodes: queued
    widget.segmenter.cancel_encoding()
    gate.release()
    qtbot.waitUntil(lambda: widget.segmenter.embedding_ready, timeout=20000)
    cache = session_for(viewer).cache
    assert widget.segmenter.encoder.current_key() in cache and stopped_key not in cache
    assert gate.passes == 2 and gate.blocks_run == GATE_BLOCK + 1 + DEPTH


def test_cancel_of_propagation_stops_inside_a_slice_encode(viewer, qtbot, make_widget, gated_model):
    model, gate = gated_model
    stack = np.stack([blob_image()] * 5)
    layer = viewer.add_image(stack, name="stack")
    widget = make_widget(model, auto_encode=False)
    labels = viewer.add_labels(np.zeros(stack.shape, np.int32), name="mine")
    labels.data[2, 30:70, 40:90] = 5  # the object to propagate, on the shown slice
    before = labels.data.copy()
    widget.set_labels_layer(labels)
    widget.set_image_layer(layer)
    viewer.dims.set_current_step(0, 2)
    gate.reached.set()  # the shown slice encodes whole; the gate holds the next slice's encode
    assert widget.encode_current_slice(wait=True)
    gate.reached.clear()
    assert widget.refine_label(5) and widget.current_masks is not None  # previewed: label 5
    blocks_before = gate.blocks_run
    assert widget.propagate(wait=False) is not None
    cancel_mid_encode(qtbot, gate, lambda: qtbot.mouseClick(widget.volume._cancel_button, Qt.MouseButton.LeftButton),
                      lambda: widget.volume.running)
    assert gate.blocks_run - blocks_before == GATE_BLOCK + 1  # the next slice's encode stopped
    np.testing.assert_array_equal(labels.data, before)
    assert "cancelled" in widget.status


def test_preview_redrawn_in_place_matches_a_full_redraw(viewer, qtbot, tmp_path):
    """Clicks update only the changed box of the preview (napari's partial label
    update, contours included); what is drawn must equal a full redraw of the layer.
    When that path fails, the preview falls back to a full redraw, still correct."""
    from oracle import OracleSam
    from test_napari_first_hour import click
    from test_napari_widget import centroid, objects_2d

    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    assert widget.encode_current_slice(wait=True)
    viewer.layers["SAM points"].opacity = 0  # only the preview differs between the shots
    viewer.reset_view()
    qtbot.wait(50)
    preview = viewer.layers["SAM preview"]
    partial_updates = []
    preview.events.labels_update.connect(lambda event: partial_updates.append(event.offset))
    napari_partial_refresh = preview._partial_labels_refresh

    def broken_partial_refresh():
        raise RuntimeError("a napari internal changed")

    for k, contour, broken in ((2, 0, False), (3, 0, False), (2, 2, False), (3, 0, True)):
        preview.contour = contour
        preview._partial_labels_refresh = broken_partial_refresh if broken else napari_partial_refresh
        widget.clear()
        qtbot.wait(50)
        partial_updates.clear()
        click(viewer, qtbot, layer.data_to_world(centroid(truth == k)))
        qtbot.wait(50)
        np.testing.assert_array_equal(preview.data > 0, widget.current_masks[0])
        assert len(partial_updates) == (0 if broken else 1)  # the click's redraw was (not) in place
        assert preview._updated_slice is None
        partial = viewer.screenshot(str(tmp_path / f"partial{k}_{contour}_{broken}.png"), canvas_only=True,
                                    flash=False)
        preview.refresh()
        qtbot.wait(50)
        full = viewer.screenshot(canvas_only=True, flash=False)
        assert np.abs(partial.astype(int) - full.astype(int)).max() <= 1
    preview._partial_labels_refresh = napari_partial_refresh
    widget.clear()
    qtbot.wait(50)
    assert not preview.data.any()
