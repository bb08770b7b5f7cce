"""Headless equivalent of `napari -w napari-sam "Segment Anything"`: open the given files
(or a sample image), dock the plugin's widget from its manifest, save a screenshot."""

from __future__ import annotations

import sys
from pathlib import Path

import napari


def main(paths: list[str]) -> int:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    if paths:
        viewer.open(paths)
    else:
        viewer.open_sample("napari-sam", "coins")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    from qtpy.QtWidgets import QApplication

    for _ in range(20):  # let Qt lay out the dock before the screenshot
        QApplication.processEvents()
    viewer.reset_view()
    out = Path("napari-sam-screenshot.png").resolve()
    viewer.screenshot(str(out), canvas_only=False)
    print(f"napari-sam docked ({type(widget).__name__}); layers: {[l.name for l in viewer.layers]}")
    print(f"screenshot: {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
