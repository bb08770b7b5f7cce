"""The plugin's real workflows, through the entry points users use (issue 8).

Widgets are docked with ``viewer.window.add_plugin_dock_widget`` (napari hands each a
proxy of the viewer) and closed as their x button does; the store made by the CLI is
made by the installed ``napari-sam`` command. Geometry is checked with the oracle model
(tests/oracle.py): the truth of every object is known.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from oracle import OracleSam
from test_cli_embed import napari_sam, random_vit_t_checkpoint
from test_napari_volume import MID, NZ, ellipsoid, iou, prompt_middle
from test_napari_widget import centroid, objects_2d

from conftest import close, dock, patch_build_sam
from napari_sam._napari.session import session_for

pytestmark = pytest.mark.gui


# ---------------------------------------------------------------- 1. one model per viewer
def test_widgets_share_one_model_however_opened_and_reopened(viewer, qtbot, monkeypatch):
    viewer.add_image(objects_2d()[0], name="cells")
    model = patch_build_sam(monkeypatch, OracleSam(image_size=256))
    anything = dock(viewer, "Segment Anything")
    assert anything.load_model("vit_t", "w.pt", wait=False) is not None  # the Load model button's path
    assert anything.loader.wait(20)
    assert anything.session.model is model

    everything = dock(viewer, "Segment Everything")
    assert everything.session is anything.session is session_for(viewer)
    assert "No model" not in everything._model_label.text() and "oracle" in everything._model_label.text()

    close(viewer, anything)  # the x button; then Plugins > napari-sam > Segment Anything again
    again = dock(viewer, "Segment Anything")
    assert again is not anything and again.session.model is model
    assert "oracle" in again._model_label.text()
    assert again.encode_current_slice(wait=True) and again.add_point((125, 45))
    assert again.current_masks is not None


def test_closing_a_widget_unhooks_it(viewer, qtbot):
    viewer.add_image(objects_2d()[0], name="cells")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    close(viewer, widget)
    # its key bindings and event hooks are gone: a new image does not reach it
    viewer.add_image(objects_2d()[0], name="other")
    assert widget.segmenter.image_layer is not viewer.layers["other"]
    assert widget.segmenter._connections == []


def test_load_failure_reaches_status_not_a_traceback(viewer, qtbot, monkeypatch):
    import napari_sam.engine
    from napari_sam import CheckpointDownloadError

    def offline(*args, **kwargs):
        raise CheckpointDownloadError("offline: could not download vit_b")

    monkeypatch.setattr(napari_sam.engine, "build_sam", offline)
    shown = []
    monkeypatch.setattr("napari_sam._napari.jobs.notify_error", shown.append)
    widget = dock(viewer, "Segment Anything")
    assert widget.load_model("vit_b", "w.pt", wait=False) is not None
    assert widget.loader.wait(20)
    assert "offline" in widget.status and shown and "offline" in shown[0]
    assert widget._load_button.text() == "Load model" and widget.session.model is None


# ---------------------------------------------------------------- 2. the README's store workflow
def test_store_made_by_the_cli_opens_in_napari_as_it_is(viewer, tmp_path, tmp_path_factory):
    """``napari-sam embed`` (robust percentiles), then Open embedding store on the same
    stack: reused, every slice ready, the store's normalisation used, no encoder call."""
    from napari_sam.engine import build_sam

    zz, yy, xx = np.mgrid[:3, :48, :64]
    stack = (((yy - 24) ** 2 + (xx - 30) ** 2 < (8 + 3 * zz) ** 2) * 1500 + 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    checkpoint = random_vit_t_checkpoint(tmp_path_factory)
    store_path = tmp_path / "s.zarr"
    done = napari_sam("embed", tmp_path / "stack.tif", "--store", store_path, "--model", "vit_t",
                      "--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    files_before = sorted(p.relative_to(store_path) for p in store_path.rglob("*"))

    layer = viewer.add_image(tifffile.imread(tmp_path / "stack.tif"), name="stack")  # display contrast != store's
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False
    model = build_sam("vit_t", checkpoint=checkpoint, device="cpu", precision="fp32")
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    widget.set_model(model)
    widget.set_image_layer(layer)
    viewer.dims.set_current_step(0, 1)
    store = widget.open_store(store_path, wait=True)
    assert store is not None and store.status.state == "reused" and store.ready.all()
    assert "the store's contrast limits" in widget.volume._ready.text()
    assert widget.encode_current_slice(wait=True) and widget.add_point((24.0, 30.0))
    assert widget.current_masks is not None and calls == []  # served from the store
    assert sorted(p.relative_to(store_path) for p in store_path.rglob("*")) == files_before


def test_mismatched_store_asks_and_cancel_keeps_it(viewer, tmp_path):
    vol, _ = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    widget.set_image_layer(layer)
    path = tmp_path / "s.zarr"
    assert widget.open_store(path, wait=True) is not None, widget.status
    assert widget.precompute_store(wait=True).n_ready == NZ
    (path / "notes.txt").write_text("mine")

    widget.segmenter.auto_encode = False  # keep the status line on the store
    other = viewer.add_image(np.roll(vol, 5, axis=2), name="other data")
    widget.set_image_layer(other)
    asked = []
    widget.volume.ask_on_mismatch = lambda error: asked.append(error) or "cancel"
    worker = widget.open_store(path, wait=False)  # the button's path: a dialog asks
    assert worker is not None and widget.volume.wait(30)
    assert len(asked) == 1 and "data" in asked[0].changed
    assert "nothing changed" in widget.status and widget.session.store_for(other) is None
    assert (path / "notes.txt").read_text() == "mine"

    widget.volume.ask_on_mismatch = lambda error: "read_only"
    widget.open_store(path, wait=False)
    assert widget.volume.wait(30)
    store = widget.session.store_for(other)
    assert store is not None and store.read_only and store.ready.all()
    assert "read-only" in widget.volume._ready.text()

    widget.volume.ask_on_mismatch = lambda error: "recompute"
    widget.open_store(path, wait=False)
    assert widget.volume.wait(30)
    store = widget.session.store_for(other)
    assert not store.read_only and store.ready.sum() == 0  # cleared: made for other data
    assert (path / "notes.txt").read_text() == "mine"  # only our files were removed


# ---------------------------------------------------------------- 4. labels exactly where shown
@pytest.mark.parametrize("geometry", ["finer", "coarser", "translated", "rotated"])
def test_commit_into_labels_of_another_geometry(viewer, make_widget, geometry):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    kw = {"finer": dict(scale=(0.5, 0.5), translate=(-0.25, -0.25), shape=(320, 512)),
          "coarser": dict(scale=(2.0, 2.0), translate=(0.5, 0.5), shape=(80, 128)),
          "translated": dict(translate=(7.0, -11.0), shape=(160, 256)),
          "rotated": dict(rotate=90, shape=(256, 160))}[geometry]
    shape = kw.pop("shape")
    labels = viewer.add_labels(np.zeros(shape, np.uint16), name="target", **kw)
    if geometry == "rotated":  # turned a quarter, then moved onto the image
        corners = np.array([labels.data_to_world(c) for c in [(0, 0), (255, 0), (0, 159), (255, 159)]])
        labels.translate = np.asarray(labels.translate) - corners.min(axis=0)
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(labels)
    assert widget.encode_current_slice(wait=True)
    assert widget.add_point(layer.data_to_world(centroid(truth == 2)))
    assert widget.commit().label_ids == [1]
    # what napari shows: the label under each image pixel's world position
    rr, cc = np.mgrid[:160, :256]
    world = np.stack([rr.ravel(), cc.ravel()], 1) * np.asarray(layer.scale) + np.asarray(layer.translate)
    shown = np.array([labels.get_value(w, world=True) or 0 for w in world[::7]])
    expected = (truth == 2).ravel()[::7]
    assert iou(shown == 1, expected) >= (0.97 if geometry != "coarser" else 0.85)
    if geometry == "finer":  # every fine pixel inside the object, not one in four
        assert (labels.data == 1).sum() >= 0.97 * 4 * (truth == 2).sum()


def test_3d_labels_over_a_2d_image_are_written_at_the_slider(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    labels = viewer.add_labels(np.zeros((5, 160, 256), np.uint16), name="stack labels")
    viewer.dims.set_current_step(0, 3)
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(labels)
    assert widget.encode_current_slice(wait=True)
    assert widget.add_point(layer.data_to_world(centroid(truth == 1)))
    assert widget.commit().label_ids == [1]
    assert iou(labels.data[3] == 1, truth == 1) >= 0.97
    assert not labels.data[[0, 1, 2, 4]].any()


def test_segment_everything_writes_through_world_coordinates(viewer):
    from test_automatic_oracle import FastOracle, draw_objects

    image, truth = draw_objects((220, 256), grid=(2, 2), seed=3, radius=(14, 30))
    viewer.add_image(image, name="image")
    labels = viewer.add_labels(np.zeros(image.shape, np.uint16), name="shifted", translate=(10, -20))
    widget = dock(viewer, "Segment Everything")
    session_for(viewer).set_model(FastOracle(image_size=256))
    widget.set_params(points_per_side=16, stability_score_thresh=0.8)
    widget.set_labels_layer(labels)
    assert widget.run(scope="slice", wait=True) is labels
    seen = labels.data[:-10, 20:]  # labels pixel (i, j) lies on image pixel (i + 10, j - 20)
    ids = []
    for t in truth:
        values, counts = np.unique(seen[t[10:, :-20]], return_counts=True)
        assert values[np.argmax(counts)] > 0 and counts.max() >= 0.9 * t[10:, :-20].sum()
        ids.append(values[np.argmax(counts)])
    assert len(set(ids)) == len(truth)


def test_refine_then_propagate_replaces_the_old_object(viewer, make_widget):
    vol, truth = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    old = np.zeros(vol.shape, np.uint16)
    old[MID - 3 : MID + 4, 10:30, 10:30] = 5  # a wrong object with id 5 around the middle
    labels = viewer.add_labels(old, name="objects")
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(labels)
    widget.set_image_layer(layer)
    viewer.dims.set_current_step(0, MID)
    assert widget.encode_current_slice(wait=True)
    assert widget.refine_label(5) and "refining label 5" in widget.status
    assert widget.add_point((48.0, 64.0))  # a click on the real object
    assert widget.propagate(wait=True) is not None
    assert iou(labels.data == 5, truth) >= 0.9
    far = ~ndimage.binary_dilation(truth, iterations=3)
    assert not (labels.data == 5)[far].any()  # the old object's own pixels are gone
    assert set(np.unique(labels.data)) == {0, 5}


# ---------------------------------------------------------------- 5. all or nothing
def test_full_uint8_labels_refuse_and_write_nothing(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    data = np.zeros(img.shape, np.uint8)
    data[0, 0] = 254
    labels = viewer.add_labels(data, name="small ids")
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(labels)
    assert widget.encode_current_slice(wait=True)
    widget.add_box(layer.data_to_world((20, 20)), layer.data_to_world((75, 95)))
    widget.add_box(layer.data_to_world((95, 15)), layer.data_to_world((150, 90)))
    result = widget.commit()  # two objects: 255 and 256 -> refused, nothing written
    assert result.label_ids == [] and "not committed" in widget.status and "uint8" in widget.status
    np.testing.assert_array_equal(labels.data, data)
    widget.clear()
    widget.add_point(layer.data_to_world(centroid(truth == 2)))
    assert widget.commit().label_ids == [255]  # the layer still works


def test_object_covered_by_existing_labels_uses_no_id(viewer, make_widget):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    covered = ndimage.binary_dilation(truth == 2, iterations=4)  # the object and its rim
    labels = viewer.add_labels(np.where(covered, 9, 0).astype(np.uint16), name="done")
    widget = make_widget(OracleSam(image_size=256))
    widget.set_labels_layer(labels)
    assert widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world(centroid(truth == 2)))
    before = labels.data.copy()
    result = widget.commit()
    assert result.label_ids == [] and "no id used" in widget.status
    np.testing.assert_array_equal(labels.data, before)
    widget.clear()
    widget.add_point(layer.data_to_world(centroid(truth == 1)))
    assert widget.commit().label_ids == [10]


def test_shift_enter_without_model_says_why(viewer):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    widget = dock(viewer, "Segment Anything")
    widget.add_point(layer.data_to_world(centroid(truth == 1)))
    widget.commit()
    assert "load a model first" in widget.status


# ---------------------------------------------------------------- 7. widget lifetime
class SlowOracle(OracleSam):
    def encode(self, x):
        time.sleep(0.15)
        return super().encode(x)


def test_closing_the_widget_cancels_its_propagation(viewer, make_widget, qtbot):
    vol, _ = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = make_widget(SlowOracle(image_size=256))
    prompt_middle(viewer, widget, layer)
    names = [la.name for la in viewer.layers]
    worker = widget.propagate(wait=False)
    assert worker is not None
    qtbot.wait(300)
    close(viewer, widget)  # joins the job: nothing lands afterwards
    assert not widget.volume.running
    qtbot.wait(500)
    assert [la.name for la in viewer.layers] == names  # no "SAM labels" appeared


def test_closing_the_viewer_window_after_opening_a_store_is_clean(viewer, tmp_path):
    vol, _ = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(SlowOracle(image_size=256))
    widget.set_image_layer(layer)
    assert widget.open_store(tmp_path / "s.zarr", wait=True) is not None
    assert widget.precompute_store(wait=False) is not None
    viewer.window.remove_dock_widget("all")  # what closing the window does to its docks
    assert not widget.volume.running  # cancelled and joined, not left running
    store = session_for(viewer).store_for(layer)
    assert 0 < store.ready.sum() < NZ  # stopped early; what was stored is valid


# ---------------------------------------------------------------- 11. inputs
def test_add_point_refuses_nan(viewer, make_widget):
    viewer.add_image(objects_2d()[0], name="cells")
    widget = make_widget(OracleSam(image_size=256))
    assert not widget.add_point((np.nan, 30))
    assert "finite" in widget.status
    assert len(viewer.layers["SAM points"].data) == 0
    assert not widget.add_box((np.nan, 0), (10, 10)) and "finite" in widget.status


def test_workers_never_read_layer_state(viewer, make_widget, monkeypatch):
    """Contrast limits (GUI state) are read on the GUI thread when a job starts, never
    by the worker: propagation and segment-everything through their workers."""
    import threading

    from napari.layers import Image

    readers = []
    original = Image.contrast_limits

    def recording(layer):
        readers.append(threading.current_thread() is threading.main_thread())
        return original.fget(layer)

    monkeypatch.setattr(Image, "contrast_limits", property(recording, original.fset))
    vol, _ = ellipsoid()
    layer = viewer.add_image(vol.astype(np.uint16) * 10, name="stack")  # not uint8: limits matter
    widget = make_widget(OracleSam(image_size=256))
    prompt_middle(viewer, widget, layer)
    readers.clear()
    assert widget.propagate(wait=False) is not None and widget.volume.wait(60)
    assert "label 1" in widget.status
    everything = dock(viewer, "Segment Everything")
    everything.set_params(points_per_side=4)
    everything.set_image_layer(layer)
    assert everything.run(scope="stack") is not None and everything.wait(120)
    assert "objects written" in everything.status
    assert readers and all(readers), "a worker thread read layer.contrast_limits"


def test_closing_a_viewer_right_after_opening_a_store(qapp, tmp_path):
    import napari

    vol, _ = ellipsoid()
    other = napari.Viewer(show=False)
    try:
        layer = other.add_image(vol, name="stack")
        widget = dock(other, "Segment Anything")
        widget.set_model(SlowOracle(image_size=256))
        widget.set_image_layer(layer)
        assert widget.open_store(tmp_path / "s.zarr", wait=False) is not None
    finally:
        other.close()  # joins the job: no "cannot schedule new futures" later
    assert not widget.volume.running
