"""Thresholded masks interpolated only near their borders equal the full computation, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sam import SamPredictor
from napari_sam.model import sparse_upsample
from napari_sam.model.sparse_upsample import full_resolution_logits, thresholded_masks


def smooth_logits(n: int, k: int, low: int, seed: int, cells: int = 6) -> torch.Tensor:
    """(n, k, low, low) logits with a few blobs (most tiles far from 0) and exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n * k, 1, cells, cells, generator=gen) * 8
    x = F.interpolate(coarse, (low, low), mode="bicubic", align_corners=False)
    x = x + 0.01 * torch.randn(x.shape, generator=gen)
    x[..., 5, :7] = 0.0  # values exactly at the threshold
    return x.reshape(n, k, low, low)


SIZES = [  # (S, input (h, w)): square, non-square crops, sizes not multiples of 4 or of a tile
    (1024, (1024, 1024)),
    (1024, (1024, 683)),
    (1024, (601, 1024)),
    (1024, (1001, 997)),
    (256, (256, 171)),
    (256, (93, 256)),
]


@pytest.mark.parametrize("image_size, input_size", SIZES)
@pytest.mark.parametrize("thresholds", [[0.0], [-1.0, 0.0, 1.0], [0.37]])
def test_same_masks_as_full_interpolation(image_size, input_size, thresholds, monkeypatch):
    monkeypatch.setattr(sparse_upsample, "MAX_MIXED_FRACTION", 1.0)  # always the tiled path
    low = smooth_logits(2, 3, image_size // 4, seed=image_size + input_size[1], cells=2 if image_size < 1024 else 6)
    full = full_resolution_logits(low, image_size, input_size, input_size)
    sparse = sparse_upsample._sparse(low.flatten(0, 1), input_size, thresholds)
    assert sparse is not None
    for t, mask in zip(thresholds, sparse):
        expected = (full > t).flatten(0, 1)
        assert mask.shape == expected.shape and mask.dtype == torch.bool
        assert torch.equal(mask, expected), f"threshold {t}: {int((mask != expected).sum())} pixels differ"
    both = thresholded_masks(low, image_size, input_size, input_size, thresholds)
    assert all(torch.equal(m, full > t) for m, t in zip(both, thresholds))


def test_tiles_straddling_the_threshold_are_interpolated_exactly():
    """Values within float rounding of the threshold next to large ones: a guess from the
    low-res signs would be wrong somewhere; the margin sends such tiles to the exact path."""
    gen = torch.Generator().manual_seed(3)
    low = torch.full((1, 1, 64, 64), -5.0)
    low[..., 20:40, 10:50] = torch.randn(20, 40, generator=gen) * 1e-7  # hugging 0
    low[..., 50:60, 50:60] = 5.0
    full = full_resolution_logits(low, 256, (256, 256), (256, 256))
    (mask,) = thresholded_masks(low, 256, (256, 256), (256, 256), [0.0])
    assert torch.equal(mask, full > 0)
    assert 0 < int(mask.sum()) < mask.numel()


def test_smooth_logits_take_the_tiled_path():
    low = smooth_logits(1, 3, 256, seed=7)
    assert sparse_upsample._sparse(low[0], (1024, 1024), [0.0]) is not None


def test_noisy_logits_fall_back_to_the_full_path():
    low = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert sparse_upsample._sparse(low[0], (1024, 1024), [0.0]) is None
    (mask,) = thresholded_masks(low, 1024, (1024, 1024), (1024, 1024), [0.0])
    assert torch.equal(mask, full_resolution_logits(low, 1024, (1024, 1024), (1024, 1024)) > 0)


def test_resize_to_original_size_gives_the_full_result():
    low = smooth_logits(1, 3, 64, seed=5)
    (mask,) = thresholded_masks(low, 256, (256, 171), (300, 200), [0.0])
    assert torch.equal(mask, full_resolution_logits(low, 256, (256, 171), (300, 200)) > 0)


@pytest.mark.parametrize("shape", [(256, 256), (256, 171), (93, 256), (300, 200), (61, 97)])
def test_predictor_masks_match_thresholded_logits(tiny_sam, shape):
    """Real decoder outputs: predict's masks are exactly its logits (return_logits) > 0,
    whether or not the image needs the second resize or is cropped from padding."""
    rng = np.random.default_rng(0)
    image = (rng.random((*shape, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    h, w = shape
    for points in ([[w * 0.3, h * 0.6]], [[w * 0.5, h * 0.5], [w * 0.9, h * 0.1]]):
        coords, labels = np.array(points), np.ones(len(points), dtype=int)
        for multimask in (True, False):
            masks, _, low = predictor.predict(coords, labels, multimask_output=multimask)
            logits, _, low2 = predictor.predict(coords, labels, multimask_output=multimask, return_logits=True)
            assert masks.dtype == bool and masks.shape == logits.shape == (3 if multimask else 1, h, w)
            assert masks.flags.c_contiguous
            np.testing.assert_array_equal(masks, logits > tiny_sam.mask_threshold)
            np.testing.assert_array_equal(low, low2)


def test_windows_are_exact_on_cpu():
    """The fast path runs only where interpolated windows equal the full call: on a CPU
    they do (a torch update that changed the kernel's rounding would silently disable it)."""
    assert sparse_upsample._windows_are_exact(torch.device("cpu"))


def test_full_res_masks_of_a_model_without_sparse_thresholding(tiny_sam):
    """A client's model with only ``postprocess_masks`` gets the same masks, at each threshold."""
    from napari_sam.engine import full_res_masks

    class PlainModel:
        mask_threshold = tiny_sam.mask_threshold
        postprocess_masks = staticmethod(tiny_sam.postprocess_masks)

    low = smooth_logits(2, 3, 64, seed=11)
    for size in [(256, 171), (300, 200)]:
        for thresholds in (None, [-1.0, 0.5]):
            ours = full_res_masks(tiny_sam, low, (256, 171), size, thresholds)
            plain = full_res_masks(PlainModel(), low, (256, 171), size, thresholds)
            assert len(ours) == len(plain) == (1 if thresholds is None else 2)
            for a, b in zip(ours, plain):
                assert a.dtype == torch.bool and torch.equal(a, b)
