"""Shared fixtures: tiny random SAM models saved as checkpoints, reference models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Two cores on CI: keep torch from oversubscribing when napari/Qt threads run too.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real checkpoint cache from tests."""
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path_factory.mktemp("sam-cache")))


@pytest.fixture(scope="session")
def tiny_reference_and_checkpoint(tmp_path_factory):
    """(reference segment_anything Sam with random weights, path of its checkpoint)."""
    from sam_factory import TINY_VIT_B, reference_sam, save_checkpoint

    ref = reference_sam(TINY_VIT_B, seed=1)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("ckpt") / "tiny_vit_b.pth")
    return ref, path


@pytest.fixture(scope="session")
def tiny_sam(tiny_reference_and_checkpoint):
    """Our tiny model loaded from the reference checkpoint, fp32, CPU."""
    from sam_factory import TINY_VIT_B

    from napari_sam import build_sam

    _, path = tiny_reference_and_checkpoint
    return build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="fp32")


# --- napari GUI fixtures (napari/Qt imported lazily: engine tests never pay for them) ---


@pytest.fixture(scope="module")
def shared_viewer(qapp):
    """One napari viewer per test module (creating one costs seconds here), shown (under
    Xvfb) so that screenshots are real. Every GUI test uses it: napari's own
    ``make_napari_viewer`` swaps the plugin manager, and a plain ``napari.Viewer`` made
    after it fails to register napari's builtin plugins again."""
    import napari

    viewer = napari.Viewer(show=True)
    yield viewer
    viewer.close()


@pytest.fixture
def viewer(shared_viewer):
    """The module's viewer, emptied, in 2D and with a new napari-sam session before and
    after each test."""
    from napari_sam._napari.session import drop_session

    shared_viewer.layers.clear()
    shared_viewer.dims.ndisplay = 2
    drop_session(shared_viewer)
    yield shared_viewer
    shared_viewer.window.remove_dock_widget("all")  # closing runs the widgets' clean-up
    shared_viewer.layers.clear()
    drop_session(shared_viewer)


def dock(viewer, name: str = "Segment Anything"):
    """Open a napari-sam widget as the Plugins menu does (napari hands it a proxy of the
    viewer); returns the widget."""
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam", name)
    return widget


def close(viewer, widget) -> None:
    """Close a docked widget as its x button does."""
    viewer.window.remove_dock_widget(widget)


@pytest.fixture
def make_widget(viewer, qtbot):
    """Factory of docked Segment Anything widgets (``add_plugin_dock_widget``, as users
    open them; they share the viewer's session); waits for their background work and
    closes them after the test."""
    made = []

    def make(model=None, auto_encode=True):
        widget = dock(viewer, "Segment Anything")
        widget.segmenter.auto_encode = auto_encode
        if model is not None:
            widget.set_model(model)
        made.append(widget)
        return widget

    yield make
    for widget in made:
        widget.volume.cancel()
        qtbot.waitUntil(
            lambda w=widget: not w.segmenter.encoding and not w.volume.running, timeout=20000
        )
        try:
            close(viewer, widget)
        except LookupError:  # the test closed it already
            pass


def patch_build_sam(monkeypatch, model):
    """Make ``napari_sam.engine.build_sam`` return ``model`` (no weights, no download);
    the calls' arguments are recorded in ``model.build_calls``."""
    import napari_sam.engine

    calls = []

    def fake_build_sam(model_type, checkpoint=None, device=None, precision="auto",
                       decoder_checkpoint=None):
        calls.append((model_type, checkpoint, device, precision))
        if decoder_checkpoint is not None:
            calls[-1] += (decoder_checkpoint,)
        return model

    monkeypatch.setattr(napari_sam.engine, "build_sam", fake_build_sam)
    model.build_calls = calls
    return model
