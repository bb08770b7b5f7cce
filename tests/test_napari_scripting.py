"""The README's scripting example runs as written (the model download is replaced by the
oracle, the only difference: no network here)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from oracle import OracleSam

pytestmark = pytest.mark.gui

# Keep identical to the README block after "<!-- scripting-example -->".
EXAMPLE = '''\
import napari
from skimage import data

viewer = napari.Viewer()
coins = viewer.add_image(data.coins(), name="coins")
_, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")

widget.load_model("vit_t")              # MobileSAM; weights are downloaded once
widget.set_image_layer(coins)
widget.encode_current_slice(wait=True)  # the GUI encodes in the background instead

widget.add_point((125, 45))             # (row, col) in world coordinates: one coin
first = widget.commit()                 # -> CommitResult(label_ids=[1], pixels=[...], ...)

widget.add_box((25, 190), (75, 242))    # two boxes = two objects, one batched decode
widget.add_box((168, 186), (218, 226))
second = widget.commit()

labels = viewer.layers["SAM labels"]
print(first.label_ids, second.label_ids, labels.data.max())
labels.undo()                           # napari's undo takes the last commit back

if __name__ == "__main__":
    napari.run()
'''


def test_readme_example_is_in_sync():
    readme = Path(__file__).parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if "<!-- scripting-example -->" not in text:
        pytest.skip("README has no scripting example block yet")
    block = re.search(r"<!-- scripting-example -->\s*```python\n(.*?)```", text, re.S)
    assert block and block.group(1) == EXAMPLE


def fake_coins() -> np.ndarray:
    """(303, 384) uint8: the three coins the example prompts, as flat discs (the oracle
    segments constant regions; on the real photo only real SAM weights make sense)."""
    img = np.zeros((303, 384), np.uint8)
    yy, xx = np.mgrid[:303, :384]
    for (r, c), value in (((125, 45), 90), ((50, 216), 150), ((193, 206), 210)):
        img[(yy - r) ** 2 + (xx - c) ** 2 < 21**2] = value
    return img


def test_readme_example_runs(monkeypatch, qtbot):
    import skimage.data

    from napari_sam._napari import session as session_module

    oracle = OracleSam(image_size=1024)
    monkeypatch.setattr(session_module, "build_sam", lambda *a, **k: oracle)
    monkeypatch.setattr(skimage.data, "coins", fake_coins)
    namespace = {"__name__": "readme_example"}
    try:
        exec(compile(EXAMPLE, "README-example", "exec"), namespace)
        first, second, labels = namespace["first"], namespace["second"], namespace["labels"]
        assert first.label_ids == [1] and second.label_ids == [2, 3]
        disc = np.pi * 21**2
        assert all(abs(p - disc) < 0.1 * disc for p in first.pixels + second.pixels)
        assert labels.data.max() == 1  # the undo removed the second commit
        assert oracle.encode_calls == 1
    finally:
        if "viewer" in namespace:
            namespace["viewer"].close()
