"""The dependency arrows of ARCHITECTURE.md: model <- engine <- _napari / cli."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import napari_sam, napari_sam.engine, napari_sam.model, napari_sam.cli
import napari_sam.engine.automatic, napari_sam.engine.store, napari_sam.engine.volume
bad = sorted(m for m in sys.modules if m.split('.')[0] in {'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'})
assert not bad, bad
"""


def test_engine_model_and_cli_do_not_import_napari_or_qt():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_model_does_not_import_the_engine_or_napari():
    from pathlib import Path

    import napari_sam.model

    model_dir = Path(napari_sam.model.__file__).parent
    for path in model_dir.glob("*.py"):
        text = path.read_text()
        for forbidden in ("..engine", "napari_sam.engine", "_napari", "import napari", "qtpy"):
            assert forbidden not in text, f"{path.name} imports {forbidden}"
