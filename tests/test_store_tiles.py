"""Tiled embedding stores: one item per (slice, tile), signatures, resume, lazy reads."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import OracleSam
from test_store import snapshot

from napari_sam.engine import SamPredictor
from napari_sam.engine.stack import single_image_stack
from napari_sam.engine.store import (
    EmbeddingStore,
    StoreMismatchError,
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


def test_a_cancelled_precompute_resumes_where_it_stopped(tmp_path):
    vol, model = disks(), OracleSam(64)
    store = tiled(tmp_path / "t.zarr", vol, model)
    cancel = threading.Event()
    done = []
    for progress in store.precompute(center=0, cancel=cancel):
        done.append(progress.index)
        if len(done) == 14:
            cancel.set()
    assert done == list(range(14))
    again = tiled(tmp_path / "t.zarr", vol, OracleSam(64))
    assert again.status.state == "reused" and "14/36 tiles ready" in again.status.message
    assert again.ready.sum() == 14 and list(again.slices_ready) == [True, False, False]
    assert again.missing_items(center=2)[:3] == [24, 25, 26]
    result = run_generator(again.precompute())
    assert (result.n_computed, result.n_ready, result.n_slices) == (22, 36, 36)
    assert again.predictor.model.encode_calls == 22 and again.slices_ready.all()


def test_a_damaged_tile_is_recomputed(tmp_path):
    vol, model = disks(), OracleSam(64)
    store = tiled(tmp_path / "t.zarr", vol, model)
    run_generator(store.precompute())
    chunk = tmp_path / "t.zarr" / "features" / "13.0.0.0"  # slice 1, tile 1
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    again = tiled(tmp_path / "t.zarr", vol, OracleSam(64))
    assert run_generator(again.verify()) == 1 and not again.ready[13] and not again.slices_ready[1]
    again.tile_embedding(1, 1)
    assert again.predictor.model.encode_calls == 1 and again.ready.all()


def test_another_tiling_is_a_mismatch_never_a_deletion(tmp_path):
    vol = disks()
    path = tmp_path / "t.zarr"
    run_generator(tiled(path, vol).precompute())
    before = snapshot(path)
    with pytest.raises(StoreMismatchError, match=r"tiling \(64x64 tiles, halo 8x8 in the store, "
                       r"96x96 tiles, halo 12x12 now\)") as info:
        tiled(path, vol, tile_shape=96, halo=None)
    assert "tiling" in info.value.changed and not info.value.usable_read_only
    with pytest.raises(StoreMismatchError, match=r"tiling \(64x64 tiles, halo 8x8 in the store, off now\)"):
        EmbeddingStore.open(path, vol, OracleSam(64))
    with pytest.raises(StoreMismatchError, match="cannot be used, even read-only"):
        tiled(path, vol, tile_shape=96, on_mismatch="read_only")
    assert snapshot(path) == before
    stored = EmbeddingStore.open(path, vol, OracleSam(64), tiling="stored")
    assert stored.status.state == "reused" and stored.grid == TileGrid((150, 200), 64, 8)
    assert stored.ready.all()
    redo = tiled(path, vol, tile_shape=96, halo=None, on_mismatch="recompute")
    assert redo.status.state == "recomputed" and redo.n_tiles == 6 and not redo.ready.any()
    assert read_store_info(path)["tiling"] == {"tile_shape": [96, 96], "halo": [12, 12]}


class RecordingVolume:
    """A huge (N, H, W) uint16 volume that exists only where it is read: pixels computed from
    their coordinates; every key read is recorded."""

    def __init__(self, shape):
        self.shape, self.dtype, self.ndim, self.reads = tuple(shape), np.dtype(np.uint16), 3, []

    def __getitem__(self, key):
        z, rows, cols = key
        assert isinstance(z, int) and isinstance(rows, slice) and isinstance(cols, slice), key
        self.reads.append(key)
        r = np.arange(*rows.indices(self.shape[1]), dtype=np.uint32)[:, None]
        c = np.arange(*cols.indices(self.shape[2]), dtype=np.uint32)[None, :]
        return ((r * 7 + c * 3 + z * 1000 + (r * c) % 251) % 4096).astype(np.uint16)

    def pixels_read(self) -> int:
        return sum(len(range(*k[1].indices(self.shape[1]))) * len(range(*k[2].indices(self.shape[2])))
                   for k in self.reads)


def test_only_tiles_are_read_from_a_lazy_volume(tmp_path):
    """Opening a tiled store of a 2.4 GB volume hashes and normalises from 16 sampled tiles,
    and a tile's embedding reads that tile only: never a whole slice."""
    vol = RecordingVolume((2, 20000, 30000))
    store = EmbeddingStore.open(tmp_path / "big.zarr", vol, OracleSam(256), tiling="on",
                                tile_shape=1024, halo=128)
    grid = store.grid
    assert grid.grid_shape == (26, 39) and store.n_items == 2 * 26 * 39
    outer = {(t.outer_rc[0], t.outer_rc[2]) for t in grid.tiles}
    for _, rows, cols in vol.reads:  # each read lies in one tile
        assert (rows.start, cols.start) in outer and rows.stop - rows.start == 1024
    assert len(vol.reads) == 32 and vol.pixels_read() <= 16 * 1024 * 1024 * 5 // 4
    vol.reads.clear()
    tile = grid.tiles[500]
    embedding = store.tile_embedding(1, tile)
    assert vol.reads == [(1, *tile.outer_slices)] and embedding.original_size == (1024, 1024)
    assert store.ready.sum() == 1 and store.ready[store.item(1, tile)]


def test_a_worker_attaches_without_hashing_and_checks_the_signature(tmp_path):
    vol = RecordingVolume((2, 3000, 2000))
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, OracleSam(256), tiling="on",
                                tile_shape=1024, halo=128)
    vol.reads.clear()
    worker = EmbeddingStore.attach(tmp_path / "s.zarr", vol, OracleSam(256), store.signature)
    assert vol.reads == [] and worker.status.state == "attached"
    assert worker.grid == store.grid and worker.contrast_limits == store.contrast_limits
    worker.put(5, worker.encode_item(5))
    store.refresh()
    assert list(np.flatnonzero(store.ready)) == [5] and store.get(5) is not None
    other = OracleSam(256)
    other.signature = "oracle:other"
    with pytest.raises(ValueError, match="different model"):
        EmbeddingStore.attach(tmp_path / "s.zarr", vol, other, store.signature)
    with pytest.raises(ValueError, match="expected a stack of shape"):
        EmbeddingStore.attach(tmp_path / "s.zarr", RecordingVolume((3, 3000, 2000)), OracleSam(256),
                              store.signature)
    changed = {**store.signature, "normalisation": {**store.signature["normalisation"],
                                                    "contrast_limits": [0.0, 1.0]}}
    with pytest.raises(StoreMismatchError, match="changed since the work was handed out"):
        EmbeddingStore.attach(tmp_path / "s.zarr", vol, OracleSam(256), changed)
