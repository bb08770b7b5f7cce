"""A microscopist's first hour with the Segment Anything widget (issue 10): a widget that
explains itself, never shows stale state, and keeps the user's layers usable. Widgets are
docked as the Plugins menu does; clicks are real mouse events where clicking is the point.
"""

from __future__ import annotations

import numpy as np
import pytest
from oracle import OracleSam
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit
from test_napari_volume import ellipsoid, prompt_middle
from test_napari_widget import centroid, objects_2d

from conftest import dock

pytestmark = pytest.mark.gui


def canvas_point(viewer, world_rc) -> QPoint:
    """The canvas pixel showing world (row, col) in the 2D view."""
    canvas = viewer.window._qt_viewer.canvas
    transform = canvas.view.transform * canvas.view.scene.transform
    x, y = transform.map([world_rc[1], world_rc[0], 0, 1])[:2]
    ratio = canvas.native.devicePixelRatioF()
    return QPoint(int(round(x / ratio)), int(round(y / ratio)))


def click(viewer, qtbot, world_rc) -> None:
    native = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(native, Qt.MouseButton.LeftButton, pos=canvas_point(viewer, world_rc))


def test_every_control_has_a_tooltip(viewer):
    for name in ("Segment Anything", "Segment Everything"):
        widget = dock(viewer, name)
        controls = [w for kind in (QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit)
                    for w in widget.findChildren(kind)
                    if w.isVisibleTo(widget) and not isinstance(w.parent(), QAbstractSpinBox)]
        missing = [w.text() if hasattr(w, "text") else type(w).__name__ for w in controls if not w.toolTip()]
        assert controls and not missing, (name, missing)


def test_preview_looks_different_from_committed_labels(viewer, qtbot, tmp_path):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    assert widget.encode_current_slice(wait=True)
    viewer.reset_view()
    qtbot.wait(50)
    click(viewer, qtbot, layer.data_to_world(centroid(truth == 2)))  # a real click
    assert widget.current_masks is not None
    preview = viewer.layers["SAM preview"]
    shot = viewer.screenshot(str(tmp_path / "preview.png"), canvas_only=False, flash=False)
    assert shot is not None
    widget.commit()
    labels = viewer.layers["SAM labels"]
    preview_rgba = np.asarray(preview.colormap.map(np.array([1])))[0]
    label_rgba = np.asarray(labels.colormap.map(np.array([1])))[0]
    assert np.abs(preview_rgba[:3] - label_rgba[:3]).max() > 0.3  # not the same colour


def test_undo_button_works_whatever_layer_is_active(viewer, qtbot):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    assert widget.encode_current_slice(wait=True)
    widget.add_point(layer.data_to_world(centroid(truth == 1)))
    widget.commit()
    widget.add_point(layer.data_to_world(centroid(truth == 3)))
    widget.commit()
    labels = viewer.layers["SAM labels"]
    assert viewer.layers.selection.active is viewer.layers["SAM points"]
    qtbot.mouseClick(widget._undo, Qt.MouseButton.LeftButton)
    assert not (labels.data == 2).any() and (labels.data == 1).any()
    assert "undid label(s) [2]" in widget.status
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ShiftModifier)  # the key
    assert not labels.data.any()
    assert not widget.undo_last_commit() and "nothing to undo" in widget.status


def test_deleted_points_layer_comes_back_and_clicks_work(viewer, qtbot):
    img, truth = objects_2d()
    layer = viewer.add_image(img, name="cells")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    assert widget.encode_current_slice(wait=True)
    viewer.layers.remove("SAM points")
    qtbot.waitUntil(lambda: "SAM points" in viewer.layers, timeout=5000)
    assert "was removed: made a new one" in widget.status
    viewer.layers.selection.active = viewer.layers["SAM points"]
    viewer.layers["SAM points"].mode = "add"
    viewer.reset_view()
    qtbot.wait(50)
    click(viewer, qtbot, layer.data_to_world(centroid(truth == 2)))
    assert widget.current_masks is not None


def test_prompt_layers_stay_on_top_and_the_shown_image_is_picked(viewer):
    img, truth = objects_2d()
    viewer.add_image(img, name="first")
    second = viewer.add_image(img[::-1].copy(), name="second")  # on top and selected
    widget = dock(viewer, "Segment Anything")
    assert widget.segmenter.image_layer is second
    third = viewer.add_image(img, name="third")
    names = [la.name for la in viewer.layers]
    assert names.index("third") < names.index("SAM points") and names.index("third") < names.index("SAM boxes")
    widget.set_image_layer(third)
    names = [la.name for la in viewer.layers]
    assert names[-1] == "SAM points" and names.index("SAM preview") > names.index("third")


def test_progress_bar_and_status_are_never_stale(viewer, qtbot):
    vol, _ = ellipsoid()
    layer = viewer.add_image(vol, name="stack")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    prompt_middle(viewer, widget, layer)
    assert widget.propagate(wait=False) is not None and widget.volume.wait(60)
    bar = widget.volume._progress
    assert bar.value() in (0, -1) and bar.maximum() <= 1  # idle again, not "60%"
    label = int(viewer.layers["SAM labels"].data.max())
    assert widget.refine_label(label) and widget.add_point((48.0, 60.0))
    assert f"refining label {label}" in widget.status  # still said after the decode


def test_offline_load_from_a_plain_script_does_not_kill_it(tmp_path):
    """A script without ``napari.run()``: loading a model offline fails in the worker; the
    failure reaches the status line, and the process lives on and exits normally."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import time
        import napari
        from qtpy.QtWidgets import QApplication
        import napari_sam.engine

        def offline(*args, **kwargs):
            from napari_sam import CheckpointDownloadError
            raise CheckpointDownloadError("no network: could not download vit_b")

        napari_sam.engine.build_sam = offline
        viewer = napari.Viewer(show=False)
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
        widget.load_model("vit_b", "w.pt", wait=False)
        deadline = time.monotonic() + 20
        while widget.loader.running and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        print("STATUS:", widget.status)
        viewer.close()
    ''')
    env = dict(os.environ, NAPARI_SAM_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "STATUS: SAM: loading vit_b failed: no network" in done.stdout
    assert "Traceback" not in done.stderr


def test_first_download_shows_size_and_speed_and_can_be_cancelled(viewer, qtbot, monkeypatch):
    import threading
    import time

    import napari_sam.engine.weights as weights
    from napari_sam.engine.weights import DownloadProgress

    stopped = threading.Event()  # the download ended, by its own cancel check or closed
    ran_to_end = threading.Event()

    def slow_download(model_type, cancel=None, **kwargs):
        total = 40 << 20
        try:
            for k in range(1000):
                if cancel is not None and cancel.is_set():
                    return None
                # the job runner may see the cancel first and close this generator here
                yield DownloadProgress(k << 18, total, 5.0 * (1 << 20), model_type)
                time.sleep(0.02)
            ran_to_end.set()
            return None
        finally:
            stopped.set()

    monkeypatch.setattr(weights, "download_job", slow_download)
    widget = dock(viewer, "Segment Anything")
    said = []
    widget.segmenter.status.connect(said.append)
    assert widget.load_model("vit_t", wait=False) is not None
    qtbot.waitUntil(lambda: "MiB/s" in widget.status, timeout=10000)
    assert "downloading vit_t:" in widget.status and widget._load_button.text() == "Cancel loading"
    pbar = widget.loader.job.worker.pbar
    qtbot.waitUntil(lambda: pbar.n > 0, timeout=10000)
    assert pbar.total == 40 << 10  # KiB in napari's activity dock
    qtbot.mouseClick(widget._load_button, Qt.MouseButton.LeftButton)  # Cancel loading
    # not timed (a loaded machine is slow): the job ended and the download stopped (at its
    # own check or closed by the job) long before its end (1000 chunks of 20 ms)
    assert widget.loader.wait(30) and stopped.wait(5) and not ran_to_end.is_set()
    assert "loading cancelled" in widget.status and widget.session.model is None, "\n".join(said)
    # napari's activity bar processes events inside its update: steps still shown in order
    shown = [float(m.split(": ")[1].split(" /")[0]) for m in said if m.startswith("downloading")]
    assert shown == sorted(shown), "\n".join(said)
    assert widget._load_button.text() == "Load model"
