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
