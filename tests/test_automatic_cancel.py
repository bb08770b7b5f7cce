"""Cancelling segment-everything inside a step: the job stops at its next decoder call or
upsampling chunk, not at the end of a batch of points (seconds on a CPU with vit_b)."""

from __future__ import annotations

import threading

import pytest
from test_automatic_oracle import ORACLE_PARAMS, FastOracle, draw_objects

from napari_sam import SamPredictor
from napari_sam.engine.automatic import SamAutomaticMaskGenerator, run_to_end
from napari_sam.engine.predictor import Stopped, stop_when


class CancellingOracle(FastOracle):
    """Counts decoder and upsampling calls; sets ``cancel`` at the given call."""

    def __init__(self, cancel_at_decode=None, cancel_at_upsample=None):
        super().__init__(image_size=256)
        self.cancel = threading.Event()
        self.cancel_at = {"decode": cancel_at_decode, "upsample": cancel_at_upsample}
        self.calls = {"decode": 0, "upsample": 0}
        self.after_cancel = 0

    def _count(self, kind):
        if self.cancel.is_set():
            self.after_cancel += 1
        self.calls[kind] += 1
        if self.calls[kind] == self.cancel_at[kind]:
            self.cancel.set()

    def decode(self, *args, **kwargs):
        self._count("decode")
        return super().decode(*args, **kwargs)

    def postprocess_masks(self, *args, **kwargs):
        self._count("upsample")
        return super().postprocess_masks(*args, **kwargs)


@pytest.fixture(scope="module")
def image():
    return draw_objects((220, 256), grid=(3, 3), seed=3, radius=(12, 32))[0]


def generator(model, **kwargs):
    # one batch of 256 points = 64 decoder calls of 4 prompts between two yields
    params = dict(ORACLE_PARAMS, points_per_batch=256, decode_chunk=4, **kwargs)
    return SamAutomaticMaskGenerator(model, **params)


def test_cancel_event_stops_between_decoder_calls(image):
    model = CancellingOracle(cancel_at_decode=3)
    embedding = SamPredictor(model).encode_image(image)
    gen = generator(model)
    with pytest.raises(Stopped):
        run_to_end(gen.run(image, embedding=embedding, cancel=model.cancel))
    assert model.calls["decode"] == 3 and model.after_cancel == 0
    assert not gen.predictor.is_image_set  # state released


def test_job_runner_stop_check_stops_between_decoder_calls(image):
    """The widget's runner puts each step under ``stop_when(cancel.is_set)``."""
    model = CancellingOracle(cancel_at_decode=5)
    embedding = SamPredictor(model).encode_image(image)
    job = generator(model).run(image, embedding=embedding)
    with pytest.raises(Stopped):
        while True:
            with stop_when(model.cancel.is_set):
                next(job)
    assert model.calls["decode"] == 5 and model.after_cancel == 0


def test_cancel_stops_between_upsampling_chunks(image):
    """upsample_budget of one mask per chunk: the surviving masks are upsampled one at a time."""
    model = CancellingOracle(cancel_at_upsample=2)
    embedding = SamPredictor(model).encode_image(image)
    gen = generator(model, upsample_budget=1)
    with pytest.raises(Stopped):
        run_to_end(gen.run(image, embedding=embedding, cancel=model.cancel))
    assert model.calls["upsample"] == 2 and model.after_cancel == 0


def test_uncancelled_job_gives_the_same_masks(image):
    """The checks change nothing when no one cancels (same masks as without an event)."""
    model = CancellingOracle()
    embedding = SamPredictor(model).encode_image(image)
    plain = run_to_end(generator(model).run(image, embedding=embedding))
    with_event = run_to_end(generator(model).run(image, embedding=embedding, cancel=threading.Event()))
    assert len(plain) == len(with_event) == 10  # 9 objects + background
    assert all((a == b).all() for a, b in zip(plain.boxes, with_event.boxes))
