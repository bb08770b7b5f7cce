"""Cancel reaches inside an encoder pass: it stops at the next block, not after the image.

A vit_b encode is ~12 blocks of ~0.5 s on a CPU; a tile or slice job that could only stop
between encodes would keep a user waiting for seconds after Cancel. These tests count the
blocks that ran, so they are exact, not timed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_sam.engine.predictor import SamPredictor, Stopped
from napari_sam.engine.tiled_predictor import encode_tiles_job
from napari_sam.engine.tiling import TileGrid
from napari_sam.model import SamConfig, TinyViTConfig, ViTConfig, build_model
from napari_sam.model.interrupt import stop_when
from napari_sam.model.tiny_vit import TinyViT

CONFIG = SamConfig("vit_b", "vit", ViTConfig(embed_dim=32, depth=6, num_heads=2,
                                             global_attn_indexes=(2, 5)), img_size=128)


class CancelAfter:
    """An Event-like whose ``is_set`` turns True once ``n`` encoder blocks have run."""

    def __init__(self, model, n: int) -> None:
        self.blocks_run, self.n = 0, n
        for block in _encoder_stages(model):
            block.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.blocks_run += 1

    def is_set(self) -> bool:
        return self.blocks_run >= self.n


def _encoder_stages(model):
    encoder = model.image_encoder
    return encoder.layers if isinstance(encoder, TinyViT) else encoder.blocks


TINY_VIT_T = SamConfig("vit_t", "tiny_vit", TinyViTConfig(embed_dims=(16, 32, 32, 64), depths=(1, 1, 2, 1),
                                                          num_heads=(1, 2, 2, 4)), img_size=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CONFIG)


def test_tiny_vit_encode_stops_between_its_stages():
    torch.manual_seed(0)
    model = build_model(TINY_VIT_T)
    cancel = CancelAfter(model, 1)
    with pytest.raises(Stopped):
        SamPredictor(model).encode_image(np.zeros((80, 90), np.uint8), cancel=cancel)
    assert cancel.blocks_run == 1  # of 4 stages


def test_tiny_vit_encode_stops_between_the_blocks_of_a_stage():
    """A TinyViT stage is ~1 s on a busy CPU: the check is also asked between its blocks."""
    torch.manual_seed(0)
    model = build_model(TINY_VIT_T)
    blocks = model.image_encoder.layers[2].blocks  # the stage of depth 2
    ran = []
    for block in blocks:
        block.register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises(Stopped), stop_when(lambda: len(ran) >= 1):
        SamPredictor(model).encode_image(np.zeros((80, 90), np.uint8))
    assert len(ran) == 1  # of 2


def test_encode_stops_at_the_next_block_once_cancel_is_set(model):
    predictor = SamPredictor(model)
    image = np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8)
    cancel = CancelAfter(model, 2)
    with pytest.raises(Stopped):
        predictor.encode_image(image, cancel=cancel)
    assert cancel.blocks_run == 2  # of 6: stopped right after the block that saw cancel
    # no cancel, or one never set: a whole encode, equal to the plain one
    plain = predictor.encode_image(image)
    assert torch.equal(predictor.encode_image(image, cancel=threading.Event()).features, plain.features)


def test_an_encode_with_its_own_cancel_still_obeys_the_enclosing_stop_check(model):
    """A job's stop check (the widget's runner) around an encode given its own cancel event:
    whichever is set first stops the pass."""
    predictor = SamPredictor(model)
    image = np.zeros((64, 64), np.uint8)
    outer = CancelAfter(model, 2)
    with stop_when(outer.is_set), pytest.raises(Stopped):
        predictor.encode_image(image, cancel=threading.Event())  # never set
    assert outer.blocks_run == 2  # of 6


def test_a_stop_check_belongs_to_its_thread(model):
    """A cancelled worker thread never stops an encode running on another thread."""
    predictor = SamPredictor(model)
    image = np.zeros((64, 64), np.uint8)
    results = []
    with stop_when(lambda: True):  # this thread would stop at once...
        worker = threading.Thread(target=lambda: results.append(predictor.encode_image(image)))
        worker.start()
        worker.join()
    assert len(results) == 1  # ...the other thread's encode was not stopped


def test_tiled_encode_job_returns_none_within_the_tile_being_encoded(model):
    predictor = SamPredictor(model)
    image = np.random.default_rng(1).integers(0, 255, (300, 200), dtype=np.uint8)
    grid = TileGrid(image.shape, 128, 16)
    cancel = CancelAfter(model, 6 + 3)  # the first tile whole, then 3 blocks of the second
    job = encode_tiles_job(predictor, image, grid, None, cancel=cancel)
    steps = []
    with pytest.raises(StopIteration) as stop:
        while True:
            steps.append(next(job))
    assert stop.value.value is None and len(steps) == 1 and cancel.blocks_run == 9


def test_propagation_cancel_stops_inside_the_encode_of_an_uncached_slice(model):
    """Propagation encodes slices it has not got; Cancel must not wait for that encode."""
    from napari_sam.engine import VolumeEmbeddings, propagate

    stack = np.random.default_rng(2).integers(0, 255, (5, 96, 96), dtype=np.uint8)
    embeddings = VolumeEmbeddings(stack, model, contrast_limits=None)
    embeddings.embedding(2)  # the start slice is cached, its neighbours are not
    cancel = CancelAfter(model, 3)  # 3 blocks into the encode of slice 3
    start = np.zeros((96, 96), bool)
    start[30:60, 30:60] = True
    job = propagate(model, embeddings, 2, start, cancel=cancel)
    with pytest.raises(StopIteration) as stop:
        next(job)
    assert stop.value.value is None and cancel.blocks_run == 3
    assert 3 not in embeddings._cache  # nothing half-encoded was kept
