"""SamSession: model handling, slice embeddings, cache keys and invalidation (no viewer)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from napari.layers import Image

from napari_sam._napari.geometry import SlicePlane
from napari_sam._napari.session import SamSession, normalisation, session_for
from napari_sam.engine import ImageEmbedding
from oracle import OracleSam


def plane(z: int | None, h: int, w: int) -> SlicePlane:
    index = (-1, -1) if z is None else (z, -1, -1)
    axes = (0, 1) if z is None else (1, 2)
    return SlicePlane(axes, index, (h, w))


@pytest.fixture
def stack():
    data = np.zeros((4, 40, 70), np.uint8)
    for z in range(4):
        data[z, 5 + 5 * z : 20 + 5 * z, 10:30] = 60 + 40 * z
    return Image(data, name="stack")


@pytest.fixture
def session():
    s = SamSession(cache_size=3)
    s.set_model(OracleSam(image_size=256))
    return s


def test_no_model_is_a_clear_error(stack):
    s = SamSession()
    assert not s.has_model
    with pytest.raises(RuntimeError, match="no model"):
        s.predictor
    with pytest.raises(RuntimeError, match="no model"):
        s.embedding(stack, plane(0, 40, 70))
    with pytest.raises(ValueError, match="expected a SAM model"):
        s.set_model(None)


def test_slices_are_encoded_once_and_cached(session, stack):
    model = session.model
    e0 = session.embedding(stack, plane(0, 40, 70))
    assert isinstance(e0, ImageEmbedding) and e0.original_size == (40, 70)
    assert session.embedding(stack, plane(0, 40, 70)) is e0
    assert model.encode_calls == 1
    session.embedding(stack, plane(2, 40, 70))
    assert model.encode_calls == 2
    assert session.activate(stack, plane(2, 40, 70))
    assert not session.activate(stack, plane(3, 40, 70))  # not cached: nothing encoded
    assert model.encode_calls == 2
    # the embedding is of the right slice: decode a click on slice 2's object
    masks, _, _ = session.predictor.predict(np.array([[20.0, 20.0]]), np.array([1]), multimask_output=False)
    truth = stack.data[2] > 0
    assert (masks[0] & truth).sum() / (masks[0] | truth).sum() > 0.9


def test_cache_is_bounded_and_configurable(session, stack):
    for z in range(4):
        session.embedding(stack, plane(z, 40, 70))
    assert len(session.cache) == 3
    assert session.cached_embedding(stack, plane(0, 40, 70)) is None  # least recent dropped
    session.cache_size = 1
    assert len(session.cache) == 1 and session.cache_size == 1


def test_keys_hold_slice_model_contrast_and_data_version(session, stack):
    k0 = session.key_for(stack, plane(0, 40, 70))
    assert k0.index == (0, -1, -1) and k0.model_signature == "oracle:256"
    assert k0.normalisation == ("uint8",)
    stack.contrast_limits = (0, 100)
    k1 = session.key_for(stack, plane(0, 40, 70))
    assert k1 != k0 and k1.normalisation == ("contrast", 0.0, 100.0)
    stack.contrast_limits = (0, 255)
    assert session.key_for(stack, plane(0, 40, 70)) == k0
    session.embedding(stack, plane(0, 40, 70))
    stack.data = stack.data.copy()  # new data: its entries go, the key changes
    assert len(session.cache) == 0
    assert session.key_for(stack, plane(0, 40, 70)) != k0


def test_new_image_or_model_invalidates_only_its_entries(session, stack):
    other = Image(np.ones((30, 30), np.float32), name="other")
    session.embedding(stack, plane(0, 40, 70))
    session.embedding(other, plane(None, 30, 30))
    assert len(session.cache) == 2
    assert session.invalidate_layer(other) == 1
    assert session.cached_embedding(stack, plane(0, 40, 70)) is not None
    session.embedding(other, plane(None, 30, 30))
    seen = []
    session.model_changed.connect(seen.append)
    new_model = OracleSam(image_size=1024)
    session.set_model(new_model)
    assert seen == [new_model] and len(session.cache) == 0
    session.set_model(OracleSam(image_size=1024))  # same signature: entries stay valid
    session.embedding(stack, plane(0, 40, 70))
    session.set_model(OracleSam(image_size=1024))
    assert len(session.cache) == 1


def test_contrast_limits_are_what_sam_sees(session):
    data = np.zeros((256, 256), np.uint16)
    data[64:192, 64:192] = 1000
    data[0, 0] = 60000  # a hot pixel that would wash out a min/max normalisation
    layer = Image(data, contrast_limits=(0, 2000))
    assert normalisation(layer) == ("contrast", 0.0, 2000.0)
    emb = session.embedding(layer, plane(None, 256, 256))
    session.predictor.set_embedding(emb)
    masks, _, _ = session.predictor.predict(np.array([[100.0, 100.0]]), np.array([1]), multimask_output=False)
    assert abs(int(masks[0].sum()) - 128 * 128) < 0.05 * 128 * 128


def test_rgb_and_float_slices(session):
    rgb = np.zeros((2, 30, 50, 3), np.uint8)
    rgb[1, 5:25, 5:20] = (200, 100, 0)
    layer = Image(rgb, rgb=True)
    emb = session.embedding(layer, plane(1, 30, 50))
    assert emb.original_size == (30, 50)
    flt = Image(np.random.default_rng(0).normal(size=(3, 25, 35)).astype(np.float32))
    assert session.embedding(flt, plane(2, 25, 35)).original_size == (25, 35)


def test_tiny_sam_through_load_model(tiny_reference_and_checkpoint, stack):
    from sam_factory import TINY_VIT_B

    _, path = tiny_reference_and_checkpoint
    s = SamSession()
    model = s.load_model(TINY_VIT_B, checkpoint=path, device="cpu", precision="fp32")
    assert s.model is model and model.image_size == 256
    emb = s.embedding(stack, plane(1, 40, 70))
    assert emb.features.shape == (1, 256, 16, 16)


def test_session_for_is_per_viewer_object():
    class FakeViewer:  # any weak-referenceable object
        pass

    from napari_sam._napari import session as session_module

    a, b = FakeViewer(), FakeViewer()
    sa = session_for(a)
    assert session_for(a) is sa and session_for(b) is not sa
    assert session_for(FakeViewer(), create=False) is None
    key = id(a)
    assert key in session_module._SESSIONS
    del a
    gc.collect()
    assert key not in session_module._SESSIONS  # forgotten with its viewer


def test_slice_embeddings_walk_a_stack_axis_through_the_cache(session, stack):
    from napari_sam._napari.session import SliceEmbeddings

    family = SliceEmbeddings(session, stack, plane(1, 40, 70))
    assert len(family) == 4 and family.original_size == (40, 70)
    assert family.plane(3).index == (3, -1, -1)
    e3 = family.embedding(3)
    assert session.cached_embedding(stack, plane(3, 40, 70)) is e3
    family.embedding(3)
    assert session.model.encode_calls == 1
    with pytest.raises(ValueError, match="non-displayed"):
        SliceEmbeddings(session, stack, plane(1, 40, 70), axis=2)


def test_volume_propagation_runs_on_session_embeddings(session):
    from napari_sam._napari.session import SliceEmbeddings
    from napari_sam.engine.automatic import run_to_end
    from napari_sam.engine.volume import propagate

    data = np.zeros((4, 96, 256), np.uint8)
    for z in range(4):
        data[z, 20 + 3 * z : 60 + 3 * z, 40:120] = 120
    layer = Image(data)
    family = SliceEmbeddings(session, layer, plane(1, 96, 256))
    result = run_to_end(propagate(session.model, family, 1, data[1] > 0))
    assert len(result.masks) == 4
    assert all((m == (d > 0)).mean() > 0.98 for m, d in zip(result.masks, data))
    assert session.model.encode_calls == 4  # each slice once, kept in the session cache
