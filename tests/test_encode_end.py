"""The end of an encode: the per-image decoder work is done in the worker that encoded
the image (``SamPredictor.prepare_embedding``), so applying the result on the GUI thread
is instant; the work it hands over is never used for other features or other weights."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from napari_sam import SamPredictor

POINT, LABEL = np.array([[100.0, 80.0]]), np.array([1])


def counting(model):
    """``model`` (a copy) recording the thread of each of its image-side computations."""
    model = copy.deepcopy(model)
    model.image_side_threads = []
    image_side_cache = model.image_side_cache

    def counted(features):
        model.image_side_threads.append(threading.current_thread())
        return image_side_cache(features)

    model.image_side_cache = counted
    return model


def embedding_of(model, seed: int = 0, inference: bool = False):
    image = (np.random.default_rng(seed).random((200, 256, 3)) * 255).astype(np.uint8)
    if inference:  # as a worker under inference mode would make it
        with torch.inference_mode():
            return SamPredictor(model).encode_image(image)
    return SamPredictor(model).encode_image(image)


@pytest.mark.parametrize("inference", [False, True])
def test_work_prepared_in_another_thread_is_used_by_the_first_prompt(tiny_sam, inference):
    """prepare_embedding in a worker leaves the predictor as it was; set_embedding with
    its result needs no image-side work of its own, and predicts what a plain
    set_embedding predicts."""
    model = counting(tiny_sam)
    embedding = embedding_of(model, inference=inference)
    predictor = SamPredictor(model)
    prepared = []
    worker = threading.Thread(target=lambda: prepared.append(predictor.prepare_embedding(embedding)))
    worker.start()
    worker.join()
    assert not predictor.is_image_set and model.image_side_threads == [worker]
    predictor.set_embedding(embedding, prepared[0])
    assert not predictor.features.is_inference()  # clients may use autograd on it
    masks, iou, low_res = predictor.predict(POINT, LABEL)
    assert model.image_side_threads == [worker]
    plain = SamPredictor(model)
    plain.set_embedding(embedding)
    expected = plain.predict(POINT, LABEL)
    for got, want in zip((masks, iou, low_res), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("weight", [
    "mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.weight",
    "prompt_encoder.no_mask_embed.weight",
])
def test_prepared_work_is_remade_when_the_decoder_weights_changed_since(tiny_sam, weight):
    """Weights loaded between the worker's preparation and the first prompt: the prompt
    is decoded with the new weights, as a predictor that never saw the old ones does."""
    model = copy.deepcopy(tiny_sam)
    embedding = embedding_of(model)
    predictor = SamPredictor(model)
    prepared = predictor.prepare_embedding(embedding)
    stale = SamPredictor(model)
    stale.set_embedding(embedding)
    _, _, before = stale.predict(POINT, LABEL)
    state = model.state_dict()
    state[weight] = state[weight] * -1.5
    model.load_state_dict(state)
    predictor.set_embedding(embedding, prepared)
    _, _, after = predictor.predict(POINT, LABEL)
    fresh = SamPredictor(model)
    fresh.set_embedding(embedding)
    _, _, expected = fresh.predict(POINT, LABEL)
    assert not np.allclose(before, expected)
    np.testing.assert_array_equal(after, expected)


def test_work_prepared_for_another_embedding_is_not_used(tiny_sam):
    """Handed with the wrong embedding, the prepared work is ignored: the predictor decodes
    the embedding it was given."""
    model = counting(tiny_sam)
    first, second = embedding_of(model, 0), embedding_of(model, 1)
    predictor = SamPredictor(model)
    prepared_first = predictor.prepare_embedding(first)
    predictor.set_embedding(second, prepared_first)
    assert torch.equal(predictor.features, second.features)
    _, _, got = predictor.predict(POINT, LABEL)
    assert len(model.image_side_threads) == 2  # the second image's own work, done lazily
    plain = SamPredictor(model)
    plain.set_embedding(second)
    np.testing.assert_array_equal(got, plain.predict(POINT, LABEL)[2])


def test_prepared_features_changed_in_place_are_decoded_as_they_are_now(tiny_sam):
    """Client code editing ``predictor.features`` in place after set_embedding: the
    prepared projections of the old values are not used."""
    model = copy.deepcopy(tiny_sam)
    embedding = embedding_of(model)
    predictor = SamPredictor(model)
    flipped = embedding.features * -1.0
    predictor.set_embedding(embedding, predictor.prepare_embedding(embedding))
    predictor.features.mul_(-1.0)
    _, _, got = predictor.predict(POINT, LABEL)
    fresh = SamPredictor(model)
    fresh.features = flipped
    fresh.original_size, fresh.input_size = embedding.original_size, embedding.input_size
    fresh.is_image_set = True
    np.testing.assert_array_equal(got, fresh.predict(POINT, LABEL)[2])


def test_a_background_encode_leaves_no_decoder_work_to_the_gui_thread(viewer, make_widget, qtbot):
    """The widget's background encode ends with the per-image decoder work done in its
    worker: neither applying the result nor the first click does it on the GUI thread."""
    from oracle import OracleSam
    from test_napari_first_hour import click
    from test_napari_widget import centroid, iou, objects_2d

    image, truth = objects_2d()
    layer = viewer.add_image(image, name="image")
    model = counting(OracleSam(image_size=256))
    widget = make_widget(model)  # encodes in the worker
    qtbot.waitUntil(lambda: widget.segmenter.embedding_ready and not widget.segmenter.encoding,
                    timeout=15000)
    viewer.reset_view()
    qtbot.wait(50)
    click(viewer, qtbot, layer.data_to_world(centroid(truth == 2)))
    assert iou(widget.current_masks[0], truth == 2) >= 0.95
    threads = model.image_side_threads
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


def test_a_snapshot_keeps_decoding_its_image_while_the_predictor_moves_on(tiny_sam):
    """``snapshot()`` (what the widget decodes ahead with, in another thread) predicts on
    the image current when it was taken, whatever the predictor is set to later, and
    reuses that image's decoder work instead of redoing it."""
    model = counting(tiny_sam)
    first, second = embedding_of(model, seed=0), embedding_of(model, seed=1)
    predictor = SamPredictor(model)
    predictor.set_embedding(first)
    predictor.prepare_decoder()
    snapshot = predictor.snapshot()
    predictor.set_embedding(second)
    on_second = predictor.predict(POINT, LABEL)
    worked = len(model.image_side_threads)
    on_first = snapshot.predict(POINT, LABEL)
    assert len(model.image_side_threads) == worked  # the first image's work, reused
    reference = SamPredictor(model)
    reference.set_embedding(first)
    for ours, expected in zip(on_first, reference.predict(POINT, LABEL)):
        np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(on_first[2], on_second[2])  # the two images decode differently
    assert predictor.get_embedding() is second and snapshot.get_embedding() is first
    with pytest.raises(RuntimeError):
        SamPredictor(model).snapshot()  # no image: nothing to keep
