"""The persistent embedding store: reuse, signatures, damage, full disks, bounded RAM."""

from __future__ import annotations

import errno
import shutil
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from oracle import OracleSam

from napari_sam.engine import SamPredictor
from napari_sam.engine.stack import StackView, VolumeEmbeddings
from napari_sam.engine.store import (EmbeddingStore, StoreMismatchError, StoreWriteError,
                                     outward_order, read_store_info)
from napari_sam.engine.volume import run_generator


def make_volume(n=10, h=40, w=56, dtype=np.uint8):
    z, y, x = np.mgrid[:n, :h, :w]
    vol = np.zeros((n, h, w), dtype)
    vol[(y - 20) ** 2 + (x - 20 - z) ** 2 <= 100] = 200
    vol[(y - 10) ** 2 + (x - 45) ** 2 <= 25] = 90
    return vol


def features_file(path, i):
    return path / "features" / f"{i}.0.0.0"


@pytest.fixture
def stored(tmp_path):
    vol, model = make_volume(), OracleSam(256)
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, model)
    run_generator(store.precompute())
    return tmp_path / "s.zarr", vol, model


def test_reopen_calls_the_encoder_zero_times(stored):
    path, vol, first = stored
    assert first.encode_calls == len(vol)
    model = OracleSam(256)
    store = EmbeddingStore.open(path, vol, model)
    assert store.status.state == "reused" and store.ready.all()
    result = run_generator(store.precompute())
    assert (result.n_computed, result.n_ready) == (0, len(vol))
    emb = store.embedding(3)
    assert model.encode_calls == 0
    fresh = SamPredictor(model).encode_image(vol[3])
    assert emb.features.shape == fresh.features.shape and emb.features.dtype == torch.float32
    torch.testing.assert_close(emb.features, fresh.features, atol=0.13, rtol=0)  # fp16
    assert (emb.original_size, emb.input_size) == (fresh.original_size, fresh.input_size)
    info = read_store_info(path)
    assert info["n_ready"] == len(vol) and info["model"] == model.signature


def test_precompute_goes_outward_and_follows_a_moving_centre(tmp_path):
    vol = make_volume(n=9)
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, OracleSam(256))
    order = [p.index for p in store.precompute(center=6)]
    assert order == outward_order(9, 6) == [6, 7, 5, 8, 4, 3, 2, 1, 0]
    store = EmbeddingStore.open(tmp_path / "t.zarr", vol, OracleSam(256))
    centre = [4]
    order = []
    for p in store.precompute(center=lambda: centre[0]):
        order.append(p.index)
        if len(order) == 2:
            centre[0] = 0  # the user moved to the first slice
    assert order[:4] == [4, 5, 0, 1]


def test_one_normalisation_for_the_whole_stack(tmp_path):
    vol = make_volume(dtype=np.uint16).astype(np.uint16) * 20
    vol[0] //= 10  # a dim slice: per-slice percentiles would stretch it
    model = OracleSam(256)
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, model)
    lo, hi = store.contrast_limits
    assert store.signature["normalisation"]["contrast_limits"] == [lo, hi]
    emb = store.embedding(0)
    same = SamPredictor(model).encode_image(vol[0], contrast_limits=(lo, hi))
    per_slice = SamPredictor(model).encode_image(vol[0])
    torch.testing.assert_close(emb.features, same.features, atol=0.13, rtol=0)
    assert (emb.features - per_slice.features).abs().max() > 10


@pytest.mark.parametrize("change", ["data", "model", "normalisation"])
def test_a_different_signature_recomputes_with_a_message(stored, change):
    path, vol, _ = stored
    model, limits = OracleSam(256), "auto"
    if change == "data":
        vol = vol.copy()
        vol[5, 0, 0] = 7
    elif change == "model":
        model.signature = "oracle:other-weights"
    else:
        limits = (0, 100)
    with pytest.raises(StoreMismatchError, match=change):
        EmbeddingStore.open(path, vol, model, contrast_limits=limits, on_mismatch="error")
    assert read_store_info(path)["n_ready"] == len(vol)  # "error" leaves it alone
    store = EmbeddingStore.open(path, vol, model, contrast_limits=limits)
    assert store.status.state == "recomputed" and change in store.status.changed
    assert change in store.status.message and not store.ready.any()
    run_generator(store.precompute())
    assert model.encode_calls == len(vol)


def test_damaged_slices_are_detected_and_recomputed(stored):
    path, vol, _ = stored
    features_file(path, 2).write_bytes(features_file(path, 2).read_bytes()[:1000])  # truncated
    features_file(path, 5).unlink()  # missing chunk: zarr would read zeros
    raw = bytearray(features_file(path, 7).read_bytes())
    raw[100] ^= 0xFF  # one flipped byte
    features_file(path, 7).write_bytes(bytes(raw))
    model = OracleSam(256)
    store = EmbeddingStore.open(path, vol, model)
    assert store.status.state == "reused"
    emb = store.embedding(2)  # detected on read, recomputed, stored again
    assert model.encode_calls == 1
    fresh = SamPredictor(model).encode_image(vol[2])
    torch.testing.assert_close(emb.features, fresh.features, atol=0.13, rtol=0)
    assert run_generator(store.verify()) == 2  # slices 5 and 7
    assert run_generator(store.precompute()).n_computed == 2
    assert run_generator(EmbeddingStore.open(path, vol, model).verify()) == 0


def test_corrupt_metadata_or_flags_never_crash(stored):
    path, vol, _ = stored
    (path / "done" / "4").write_bytes(b"\x01")  # truncated flag chunk
    store = EmbeddingStore.open(path, vol, OracleSam(256))
    assert store.status.state == "reused" and not store.ready[4] and store.ready.sum() == 9
    (path / ".zattrs").write_text("{not json")
    model = OracleSam(256)
    store = EmbeddingStore.open(path, vol, model)
    assert store.status.state == "rebuilt" and "unreadable" in store.status.message
    run_generator(store.precompute())
    assert model.encode_calls == len(vol)
    (path / "done" / ".zarray").unlink()
    assert EmbeddingStore.open(path, vol, OracleSam(256)).status.state == "rebuilt"
    run_generator(EmbeddingStore.open(path, vol, OracleSam(256)).precompute())
    shutil.rmtree(path / "features")  # flags left without data: nothing is ready
    store = EmbeddingStore.open(path, vol, OracleSam(256))
    assert not store.ready.any() and run_generator(store.precompute()).n_computed == len(vol)


class _FullDisk:
    """Wraps a zarr array; writes fail with ENOSPC after ``budget`` of them."""

    def __init__(self, array, budget):
        self.array, self.budget = array, budget

    def __getitem__(self, key):
        return self.array[key]

    def __setitem__(self, key, value):
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= 1
        self.array[key] = value


@pytest.mark.parametrize("which", ["_features", "_done_arr"])
def test_full_disk_is_a_clear_error_and_the_store_stays_consistent(tmp_path, which):
    vol, path = make_volume(), tmp_path / "s.zarr"
    store = EmbeddingStore.open(path, vol, OracleSam(256))
    gen = store.precompute(center=0)
    next(gen)  # one slice stored; arrays exist
    setattr(store, which, _FullDisk(getattr(store, which), 2))
    with pytest.raises(StoreWriteError, match="No space left.*slices are stored") as info:
        run_generator(gen)
    assert isinstance(info.value.__cause__, OSError)
    ready = store.ready.copy()
    assert 1 <= ready.sum() <= 3
    model = OracleSam(256)
    again = EmbeddingStore.open(path, vol, model)
    assert (again.ready == ready).all() and run_generator(again.verify()) == 0
    run_generator(again.precompute())
    assert model.encode_calls == len(vol) - ready.sum()


def test_cancelling_keeps_what_was_committed(tmp_path):
    vol, path = make_volume(), tmp_path / "s.zarr"
    store = EmbeddingStore.open(path, vol, OracleSam(256))
    gen = store.precompute(center=3)
    for _ in range(3):
        next(gen)
    gen.close()
    cancel = threading.Event()
    cancel.set()
    assert run_generator(store.precompute(cancel=cancel)).cancelled
    again = EmbeddingStore.open(path, vol, OracleSam(256))
    assert np.flatnonzero(again.ready).tolist() == [2, 3, 4]
    assert run_generator(again.verify()) == 0


def test_refuses_to_overwrite_foreign_paths(tmp_path):
    vol = make_volume(n=3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        EmbeddingStore.open(tmp_path / "mine", vol, OracleSam(256))
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(ValueError, match="expected a folder"):
        EmbeddingStore.open(tmp_path / "file.zarr", vol, OracleSam(256))
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"


class LazyStack:
    """A stack generated slice by slice; anything but reading one slice is an error."""

    def __init__(self, n, h=64, w=64):
        self.shape, self.dtype, self.ndim, self.reads = (n, h, w), np.dtype(np.uint16), 3, []

    def __getitem__(self, key):
        z, rows, cols = key
        if not isinstance(z, int) or rows != slice(None) or cols != slice(None):
            raise AssertionError(f"expected one whole slice to be read, got {key}")
        self.reads.append(z)
        rng = np.random.default_rng(z)
        return rng.integers(0, 4000, self.shape[1:], dtype=np.uint16)

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack must never be loaded")


def _peak_bytes_while_precomputing(tmp_path, n):
    store = EmbeddingStore.open(tmp_path / f"s{n}.zarr", LazyStack(n), OracleSam(256))
    store.embedding(0)  # warm-up outside the measurement
    tracemalloc.start()
    run_generator(store.precompute())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_ram_stays_bounded_whatever_the_stack_length(tmp_path):
    small = _peak_bytes_while_precomputing(tmp_path, 6)
    large = _peak_bytes_while_precomputing(tmp_path, 36)  # 6x the slices
    assert large < small + 256 * 1024, (small, large)  # one slice of features is 128 KiB


def test_tiny_sam_features_round_trip(tmp_path, tiny_sam):
    vol = make_volume(n=2, h=64, w=80)
    for dtype, tol in (("float16", 2e-2), ("float32", 0)):
        store = EmbeddingStore.open(tmp_path / dtype, vol, tiny_sam, dtype=dtype)
        run_generator(store.precompute())
        fresh = SamPredictor(tiny_sam).encode_image(vol[1], contrast_limits=store.contrast_limits)
        back = EmbeddingStore.open(tmp_path / dtype, vol, tiny_sam).get(1)
        torch.testing.assert_close(back.features, fresh.features, atol=tol, rtol=tol)
        predictor = SamPredictor(tiny_sam)
        predictor.set_embedding(back)
        masks, iou_pred, low = predictor.predict(np.array([[30.0, 20.0]]), np.array([1]))
        assert masks.shape == (3, 64, 80) and low.shape == (3, 64, 64)


def test_put_and_open_validate_their_input(stored, tmp_path):
    path, vol, model = stored
    store = EmbeddingStore.open(path, vol, model)
    other = OracleSam(256)
    other.signature = "oracle:other"
    with pytest.raises(ValueError, match="expected an embedding"):
        store.put(0, SamPredictor(other).encode_image(vol[0]))
    with pytest.raises(ValueError, match="expected a slice index"):
        store.get(len(vol))
    for kwargs, match in [({"dtype": "int8"}, "dtype"), ({"on_mismatch": "x"}, "on_mismatch"),
                          ({"contrast_limits": (5, 1)}, "contrast_limits"), ({"axis": 3}, "axis")]:
        with pytest.raises(ValueError, match=match):
            EmbeddingStore.open(tmp_path / "x.zarr", vol, model, **kwargs)
    with pytest.raises(ValueError, match="expected a 3D stack"):
        StackView(vol[0])
    with pytest.raises(ValueError, match="SamPredictor or a SAM model"):
        VolumeEmbeddings(vol, object())


def test_volume_embeddings_in_memory_with_another_axis():
    vol = make_volume(n=6)
    model = OracleSam(256)
    moved = np.moveaxis(vol, 0, 2)  # (H, W, N): stack along the last axis
    emb = VolumeEmbeddings(moved, model, axis=2, cache_size=2)
    assert len(emb) == 6 and emb.original_size == vol.shape[1:]
    a = emb.embedding(4)
    assert emb.embedding(4) is a and model.encode_calls == 1
    torch.testing.assert_close(a.features, SamPredictor(model).encode_image(vol[4]).features)
