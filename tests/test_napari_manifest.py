"""The installed npe2 manifest: validation, docking from it in a shown viewer, samples."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from oracle import OracleSam


def _npe2_cli() -> list[str]:
    exe = shutil.which("npe2")
    return [exe] if exe else [sys.executable, "-m", "npe2"]


def test_manifest_is_installed_and_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-sam")
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets}
    assert set(widgets) == {"Segment Anything", "Segment Everything"}
    assert {s.key for s in manifest.contributions.sample_data} >= {"coins", "nuclei_3d"}
    assert "napari/layers/segment" in manifest.contributions.menus
    args = ["validate", "napari-sam"]
    if importlib.util.find_spec("napari_sam._napari.everything_widget") is not None:
        args.append("--imports")  # every python_name imports
    run = subprocess.run(_npe2_cli() + args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "valid" in run.stdout, run.stdout + run.stderr


def test_samples_are_real_images(monkeypatch):
    from napari_sam._napari import sample_data

    for fn, shape in ((sample_data.coins, (303, 384)), (sample_data.cell, (660, 550)),
                      (sample_data.immunohistochemistry, (512, 512, 3))):
        [(data, meta, kind)] = fn()
        assert data.shape == shape and kind == "image" and meta["name"]
    import skimage.data

    monkeypatch.setattr(skimage.data, "cells3d", lambda: np.zeros((60, 2, 256, 256), np.uint16))
    [(data, meta, _)] = sample_data.nuclei_3d()
    assert data.shape == (60, 256, 256) and len(meta["scale"]) == 3

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(skimage.data, "cells3d", offline)
    with pytest.raises(RuntimeError, match="download"):
        sample_data.nuclei_3d()


@pytest.mark.gui
def test_dock_from_manifest_segment_and_see_it(viewer, qtbot):
    from qtpy.QtCore import Qt
    from test_napari_first_hour import canvas_point

    img = np.zeros((160, 256), np.uint8)
    img[40:120, 60:180] = 120
    viewer.add_image(img, name="blob")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(OracleSam(image_size=256))
    widget.encode_current_slice(wait=True)
    viewer.layers["SAM points"].opacity = 0  # keep the clicked point out of the picture
    viewer.reset_view()
    qtbot.wait(50)
    before = viewer.screenshot(canvas_only=True, flash=False)
    canvas = viewer.window._qt_viewer.canvas.native  # a real click, then Shift-Enter
    centre_px, background_px = canvas_point(viewer, (80, 120)), canvas_point(viewer, (80, 20))
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=centre_px)
    assert widget.current_masks is not None
    qtbot.keyClick(canvas, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    assert "committed label(s) [1]" in widget.status
    labels = viewer.layers["SAM labels"]
    assert (labels.data[40:120, 60:180] == 1).mean() > 0.97
    after = viewer.screenshot(canvas_only=True, flash=False)
    ratio = after.shape[1] / canvas.width()  # screenshot pixels per canvas pixel

    def around(p):
        x, y = int(p.x() * ratio), int(p.y() * ratio)
        return slice(y - 3, y + 3), slice(x - 3, x + 3)

    centre, corner = around(centre_px), around(background_px)  # corner: background, left of it
    change = np.abs(after[centre][..., :3].astype(int) - before[centre][..., :3].astype(int)).mean()
    assert change > 20  # the committed object is drawn in its label colour
    assert np.array_equal(after[corner], before[corner])  # background untouched
    colour = np.asarray(labels.get_color(1))[:3] * 255
    shown = after[centre][..., :3].reshape(-1, 3).mean(axis=0)
    base = before[centre][..., :3].reshape(-1, 3).mean(axis=0)
    assert np.linalg.norm(shown - colour) < np.linalg.norm(base - colour)  # towards the label colour
