"""Tiled embedding stores: one item per (slice, tile), signatures, resume, lazy reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import OracleSam

from napari_sam.engine import SamPredictor
from napari_sam.engine.stack import single_image_stack
from napari_sam.engine.store import (
    EmbeddingStore,
    read_store_info,
)
from napari_sam.engine.tiled_predictor import TiledPredictor, encode_tile
from napari_sam.engine.tiling import TileGrid, tiled_contrast_limits
from napari_sam.engine.volume import run_generator

DATA = Path(__file__).parent / "data"


def old_release_volume(name: str) -> np.ndarray:
    """The stacks of ``tests/data/release_0.1.0_*.zarr`` (stores written by napari-sam
    0.1.0 with ``OracleSam(64)``): "small" is hashed whole, "large" (> 64 MiB) by sampled
    slices."""
    n, h, w = {"small": (3, 40, 56), "large": (3, 3000, 4000)}[name]
    z = np.arange(n, dtype=np.uint32)[:, None, None]
    y = np.arange(h, dtype=np.uint32)[None, :, None]
    x = np.arange(w, dtype=np.uint32)[None, None, :]
    return ((y * 7 + x * 3 + z * 1000 + (x * y) % 251) % 4096).astype(np.uint16)


def disks(n=3, h=150, w=200, dtype=np.uint16):
    """(n, h, w) stack of bright disks moving along x, on a dim ramp (uint16: normalised)."""
    z, y, x = np.mgrid[:n, :h, :w]
    vol = (x // 4 + y // 8).astype(dtype)
    for cy, cx, r, value in [(40, 30, 12, 3000), (75, 100, 18, 2000), (120, 170, 15, 2600)]:
        vol[(y - cy) ** 2 + (x - cx - 5 * z) ** 2 <= r * r] = value
    return vol


def tiled(path, vol, model=None, **kwargs):
    kwargs = {"tiling": "on", "tile_shape": 64, "halo": 8, **kwargs}
    return EmbeddingStore.open(path, vol, model or OracleSam(64), **kwargs)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["small", "large"])
def test_stores_of_the_previous_release_are_reused(tmp_path, name):
    """Stores written by napari-sam 0.1.0 (untiled, committed under tests/data) reopen as
    "reused": same signature (hash of all pixels / of sampled slices, limits, sizes), no
    encoder call, every slice valid."""
    path = tmp_path / "old.zarr"
    shutil.copytree(DATA / f"release_0.1.0_{name}.zarr", path)
    vol, model = old_release_volume(name), OracleSam(64)
    # "auto": the small slices fit one model input (the large ones would be tiled)
    for tiling in ("off", "stored") + (("auto",) if name == "small" else ()):
        store = EmbeddingStore.open(path, vol, model, tiling=tiling)
        assert store.status.state == "reused", store.status.message
        assert store.grid is None and store.n_tiles == 1 and store.ready.all()
        assert "tiling" not in store.signature
        assert run_generator(store.verify()) == 0 and model.encode_calls == 0
        assert store.embedding(1).features.shape == (1, 256, 4, 4)


def test_a_tiled_store_holds_one_item_per_slice_and_tile(tmp_path):
    vol, model = disks(), OracleSam(64)
    store = tiled(tmp_path / "t.zarr", vol, model)
    grid = store.grid
    assert grid == TileGrid((150, 200), 64, 8) and grid.grid_shape == (3, 4)
    assert (store.n_tiles, store.n_items, len(store)) == (12, 36, 3)
    assert store.signature["tiling"] == {"tile_shape": [64, 64], "halo": [8, 8]}
    assert store.signature["original_size"] == [150, 200] and store.signature["input_size"] == [64, 64]
    progress = list(store.precompute(center=1))
    assert [p.index for p in progress] == list(range(12, 24)) + list(range(24, 36)) + list(range(12))
    assert [(p.slice_index, p.tile_index) for p in progress[:2]] == [(1, 0), (1, 1)]
    assert progress[-1].n_ready == progress[-1].n_slices == 36 and model.encode_calls == 36
    info = read_store_info(tmp_path / "t.zarr")
    assert info["n_ready"] == 36 and info["tiling"] == grid.as_dict()
    meta = json.loads((tmp_path / "t.zarr" / "features" / ".zarray").read_text())
    assert meta["shape"] == [36, 256, 4, 4] and meta["chunks"] == [1, 256, 4, 4]
    assert json.loads((tmp_path / "t.zarr" / "done" / ".zarray").read_text())["chunks"] == [1]
    # each item is its tile encoded at full resolution, with the store's limits
    predictor = SamPredictor(OracleSam(64))
    for index, k in [(0, 0), (2, 7), (1, 11)]:
        tile = grid.tiles[k]
        expected = encode_tile(predictor, vol[index], tile, store.contrast_limits)
        got = store.tile_embedding(index, tile)
        assert got.original_size == tile.shape_hw == (64, 64)
        torch.testing.assert_close(got.features, expected.features, atol=0.13, rtol=0)  # fp16
    with pytest.raises(ValueError, match="tile_embedding"):
        store.embedding(0)


def test_one_normalisation_from_sampled_tiles(tmp_path):
    """A single 2D image: the store's limits are those of TiledPredictor.set_image (same
    sampled tiles), so stored and in-memory tiles are encoded alike."""
    image = disks(n=1)[0]
    store = tiled(tmp_path / "i.zarr", single_image_stack(image))
    assert store.contrast_limits == tiled_contrast_limits(image, store.grid)
    predictor = TiledPredictor(OracleSam(64))
    predictor.set_tiles(store.grid, lambda k: store.tile_embedding(0, k), store.contrast_limits)
    masks, _, _ = predictor.predict(np.array([[30, 40]]), np.array([1]), multimask_output=False)
    y, x = np.mgrid[:150, :200]
    truth = (y - 40) ** 2 + (x - 30) ** 2 <= 12 * 12
    assert (masks[0] & truth).sum() / (masks[0] | truth).sum() > 0.9
