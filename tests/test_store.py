"""The persistent embedding store: reuse, signatures, damage, full disks, bounded RAM."""

from __future__ import annotations

import errno
import json
import shutil
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from oracle import OracleSam

from napari_sam.engine import SamPredictor
from napari_sam.engine.stack import StackView, VolumeEmbeddings
from napari_sam.engine.store import (FORMAT_VERSION, EmbeddingStore, StoreError,
                                     StoreMismatchError, StoreReadError, StoreWriteError,
                                     outward_order, read_store_info, stored_contrast_limits)
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


def snapshot(path):
    """Every file and folder under ``path`` with its bytes and mtime (to prove nothing changed)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def changed_input(change, vol):
    """(volume, model, contrast_limits) differing from the ``stored`` fixture's in ``change``."""
    model, limits = OracleSam(256), "auto"
    if change == "data":
        vol = vol.copy()
        vol[5, 0, 0] = 7
    elif change == "model":
        model.signature = "oracle:other-weights"
    else:
        limits = (0, 100)
    return vol, model, limits


@pytest.mark.parametrize("change", ["data", "model", "normalisation"])
def test_a_different_signature_is_refused_by_default_and_recomputed_on_request(stored, change):
    path, vol, _ = stored
    vol, model, limits = changed_input(change, vol)
    before = snapshot(path)
    with pytest.raises(StoreMismatchError, match=change) as info:
        EmbeddingStore.open(path, vol, model, contrast_limits=limits)  # default: "error"
    assert "on_mismatch='recompute'" in str(info.value) and str(path) in str(info.value)
    assert info.value.changed == (change,) and info.value.path == path
    assert snapshot(path) == before  # refused: nothing touched
    store = EmbeddingStore.open(path, vol, model, contrast_limits=limits, on_mismatch="recompute")
    assert store.status.state == "recomputed" and store.status.changed == (change,)
    assert change in store.status.message and not store.ready.any()
    run_generator(store.precompute())
    assert model.encode_calls == len(vol)
    assert EmbeddingStore.open(path, vol, model, contrast_limits=limits).status.state == "reused"


def test_mismatch_messages_say_what_differs(stored):
    path, vol, _ = stored
    with pytest.raises(StoreMismatchError, match=r"normalisation \(contrast limits None "
                       r"in the store, \[0, 100\] now\)"):
        EmbeddingStore.open(path, vol, OracleSam(256), contrast_limits=(0, 100))
    with pytest.raises(StoreMismatchError, match=r"data \(shape \[10, 40, 56\] in the store, "
                       r"\[11, 40, 56\] now\)"):
        EmbeddingStore.open(path, make_volume(n=11), OracleSam(256))
    with pytest.raises(StoreMismatchError, match=r"data \(same shape, other pixels\)"):
        EmbeddingStore.open(path, vol[::-1].copy(), OracleSam(256))


def test_a_package_upgrade_keeps_the_store_a_format_change_does_not(stored):
    path, vol, _ = stored
    attrs = json.loads((path / ".zattrs").read_text())
    assert "package_version" in attrs["napari_sam_store"]  # still recorded, as information
    attrs["napari_sam_store"]["package_version"] = "0.0.1"  # made by an older napari-sam
    (path / ".zattrs").write_text(json.dumps(attrs))
    model = OracleSam(256)
    store = EmbeddingStore.open(path, vol, model)
    assert store.status.state == "reused" and store.ready.all()
    assert run_generator(store.precompute()).n_computed == 0 and model.encode_calls == 0
    del attrs["napari_sam_store"]["package_version"]  # not recorded at all: fine too
    (path / ".zattrs").write_text(json.dumps(attrs))
    assert EmbeddingStore.open(path, vol, model).status.state == "reused"
    attrs["napari_sam_store"]["format"] = FORMAT_VERSION + 1
    (path / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(StoreMismatchError, match="store format") as info:
        EmbeddingStore.open(path, vol, model)
    assert info.value.changed == ("format",) and not info.value.usable_read_only


def test_recompute_removes_only_what_the_store_wrote(stored):
    path, vol, _ = stored
    (path / "notes.txt").write_text("mine")
    (path / "features" / "README").write_text("also mine")
    (path / "analysis").mkdir()
    (path / "analysis" / "result.csv").write_text("1,2")
    vol = vol.copy()
    vol[0, 0, 0] = 1
    model = OracleSam(256)
    store = EmbeddingStore.open(path, vol, model, on_mismatch="recompute")
    assert store.status.state == "recomputed" and not store.ready.any()
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "features" / "README").read_text() == "also mine"
    assert (path / "analysis" / "result.csv").read_text() == "1,2"
    assert not features_file(path, 3).exists()  # the old chunks are gone
    run_generator(store.precompute())
    again = EmbeddingStore.open(path, vol, OracleSam(256))
    assert again.status.state == "reused" and again.ready.all()
    assert run_generator(again.verify()) == 0
    assert (path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change", ["data", "normalisation"])
def test_read_only_serves_stored_slices_and_never_writes(stored, change):
    path, vol, first = stored
    stored_features = EmbeddingStore.open(path, vol, first).get(4).features
    raw = bytearray(features_file(path, 7).read_bytes())
    raw[100] ^= 0xFF  # a damaged slice: forgotten in memory, not on disk
    features_file(path, 7).write_bytes(bytes(raw))
    vol, model, limits = changed_input(change, vol)
    before = snapshot(path)
    store = EmbeddingStore.open(path, vol, model, contrast_limits=limits, on_mismatch="read_only")
    assert store.read_only and store.status.state == "read_only"
    assert f"read-only, made for a different {change}" in store.status.message
    assert store.status.changed == (change,) and store.ready.all()
    torch.testing.assert_close(store.embedding(4).features, stored_features)  # as stored
    assert model.encode_calls == 0
    assert store.get(7) is None and not store.ready[7]  # damaged
    emb = store.embedding(7)  # encoded in memory, not stored
    assert model.encode_calls == 1 and store.embedding(7) is emb and model.encode_calls == 1
    assert run_generator(store.verify()) == 0
    with pytest.raises(StoreError, match="read-only"):
        store.put(7, emb)
    with pytest.raises(StoreError, match="read-only"):
        store.precompute()  # refused at once, not at the first next()
    assert snapshot(path) == before
    assert read_store_info(path)["n_ready"] == len(vol)


@pytest.mark.parametrize("change", ["model", "size", "slices"])
def test_read_only_refuses_features_of_another_model_or_size(stored, change):
    path, vol, _ = stored
    model = OracleSam(256)
    if change == "model":
        model.signature = "oracle:other-weights"
    elif change == "size":
        vol = make_volume(w=60)
    else:
        vol = make_volume(n=12)
    before = snapshot(path)
    with pytest.raises(StoreMismatchError, match="cannot be used, even read-only") as info:
        EmbeddingStore.open(path, vol, model, on_mismatch="read_only")
    assert not info.value.usable_read_only and "on_mismatch='recompute'" in str(info.value)
    assert {"model": "model", "size": "image size", "slices": "this stack 12"}[change] in str(info.value)
    with pytest.raises(StoreMismatchError) as refused:
        EmbeddingStore.open(path, vol, model)
    assert "on_mismatch='read_only'" not in str(refused.value)  # not offered where useless
    assert snapshot(path) == before


def test_a_matching_store_opened_with_read_only_fallback_is_reused(stored):
    path, vol, _ = stored
    store = EmbeddingStore.open(path, vol, OracleSam(256), on_mismatch="read_only")
    assert store.status.state == "reused" and not store.read_only


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


def test_damaged_flags_are_missing_slices(stored):
    path, vol, _ = stored
    (path / "done" / "4").write_bytes(b"\x01")  # truncated flag chunk
    store = EmbeddingStore.open(path, vol, OracleSam(256))
    assert store.status.state == "reused" and not store.ready[4] and store.ready.sum() == 9
    shutil.rmtree(path / "features")  # flags left without data: nothing is ready
    store = EmbeddingStore.open(path, vol, OracleSam(256))
    assert not store.ready.any() and run_generator(store.precompute()).n_computed == len(vol)


@pytest.mark.parametrize("damage", ["attrs", "signature", "done-metadata", "done-shape"])
def test_an_unreadable_store_is_refused_and_left_as_it_is(stored, damage):
    path, vol, _ = stored
    if damage == "attrs":
        (path / ".zattrs").write_text("{not json")
        cause = "JSONDecodeError"
    elif damage == "signature":
        (path / ".zattrs").write_text('{"other": 1}')
        cause = "KeyError"
    elif damage == "done-metadata":
        (path / "done" / ".zarray").unlink()
        cause = "done"
    else:
        meta = json.loads((path / "done" / ".zarray").read_text())
        meta["shape"] = [3]
        (path / "done" / ".zarray").write_text(json.dumps(meta))
        cause = "expected done flags of shape (10,)"
    before = snapshot(path)
    for on_mismatch in ("error", "recompute", "read_only"):
        with pytest.raises(StoreReadError) as info:
            EmbeddingStore.open(path, vol, OracleSam(256), on_mismatch=on_mismatch)
        message = str(info.value)
        assert isinstance(info.value, StoreError) and str(path) in message and cause in message
        assert "left as it is" in message and "\n" not in message
        assert snapshot(path) == before


def test_stored_normalisation(stored, tmp_path):
    path, vol, _ = stored
    store = EmbeddingStore.open(tmp_path / "c.zarr", vol, OracleSam(256), contrast_limits=(10, 90))
    info = read_store_info(tmp_path / "c.zarr")
    assert info["normalisation"]["contrast_limits"] == [10.0, 90.0]
    reopened = EmbeddingStore.open(tmp_path / "c.zarr", vol, OracleSam(256), contrast_limits="stored")
    assert reopened.contrast_limits == (10.0, 90.0) and reopened.status.state == "reused"
    assert stored_contrast_limits(tmp_path / "c.zarr") == (10.0, 90.0)
    # no store there yet: "stored" is "auto"
    wide = vol.astype(np.uint16) * 20
    fresh = EmbeddingStore.open(tmp_path / "n.zarr", wide, OracleSam(256), contrast_limits="stored")
    auto = EmbeddingStore.open(tmp_path / "a.zarr", wide, OracleSam(256), contrast_limits="auto")
    assert fresh.status.state == "created" and fresh.contrast_limits == auto.contrast_limits
    assert fresh.contrast_limits is not None
    # a store recording None (uint8 passed through as is): "stored" gives None back
    none = EmbeddingStore.open(tmp_path / "u.zarr", vol, OracleSam(256), contrast_limits=None)
    assert read_store_info(tmp_path / "u.zarr")["normalisation"]["contrast_limits"] is None
    again = EmbeddingStore.open(tmp_path / "u.zarr", vol, OracleSam(256), contrast_limits="stored")
    assert none.contrast_limits is None and again.contrast_limits is None
    assert again.status.state == "reused"


def test_get_takes_the_lock_put_takes(stored):
    path, vol, model = stored
    store = EmbeddingStore.open(path, vol, model)
    results = []
    store._lock.acquire()  # as a worker in the middle of put() would hold it
    try:
        reader = threading.Thread(target=lambda: results.append(store.get(2)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not results  # waits for the writer
    finally:
        store._lock.release()
    reader.join(5)
    assert not reader.is_alive() and results[0] is not None


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
