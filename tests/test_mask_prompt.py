"""The one mask -> prompt-logits conversion (engine.mask_to_logits), checked through the
models' own postprocessing: a mask must come back where it was, whatever the image shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import OracleSam
from scipy import ndimage

from napari_sam.engine import SamPredictor, mask_to_logits
from napari_sam.engine.mask_prompt import MASK_LOGIT
from napari_sam.engine.volume import iou


def shapes(h: int, w: int) -> dict[str, np.ndarray]:
    """A few (h, w) bool masks scaled to the image: rectangle, disc, ring, L, thin bar."""
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - 0.55 * h) / h, (xx - 0.4 * w) / w)
    ell = np.zeros((h, w), bool)
    ell[h // 5 : 4 * h // 5, w // 6 : w // 3] = True
    ell[3 * h // 5 : 4 * h // 5, w // 6 : 5 * w // 6] = True
    rect = np.zeros((h, w), bool)
    rect[h // 4 : 3 * h // 4, w // 3 : w - 2] = True  # up to the right border
    bar = np.zeros((h, w), bool)
    bar[h - max(2, h // 8) :, :] = True  # along the bottom, next to the padding
    return {"rect": rect, "disc": r <= 0.3, "ring": (r <= 0.35) & (r >= 0.2), "L": ell, "bar": bar}


def predictor_for(model, hw) -> SamPredictor:
    predictor = SamPredictor(model)
    predictor.set_image(np.zeros(hw, np.uint8))
    return predictor


def round_trip(predictor, *masks: np.ndarray) -> np.ndarray:
    """masks -> logits -> the model's postprocess (upsample, crop, resize) -> masks:
    (H, W) bool for one mask, (N, H, W) for several."""
    logits = np.stack([mask_to_logits(m, predictor) for m in masks])  # (N, 1, h, w)
    logits = torch.from_numpy(logits)
    model = predictor.model
    up = model.postprocess_masks(logits, predictor.input_size, predictor.original_size)
    back = up[:, 0].numpy() > model.mask_threshold  # (N, H, W)
    return back[0] if len(masks) == 1 else back


# (H, W): small and upsampled, non-square both ways, square, larger than the model input
SIZES = [(24, 40), (60, 90), (90, 60), (200, 200), (700, 400)]


@pytest.mark.parametrize("hw", SIZES)
def test_logits_live_on_the_padded_low_res_grid(hw):
    predictor = predictor_for(OracleSam(256), hw)
    full = np.ones(hw, bool)
    logits = mask_to_logits(full, predictor)
    assert logits.shape == (1, 64, 64) and logits.dtype == np.float32
    assert logits.min() >= -MASK_LOGIT and logits.max() <= MASK_LOGIT
    # the image fills the top-left input_size of the (S, S) frame: 4 input pixels per cell
    h_in, w_in = predictor.input_size
    assert np.allclose(logits[0, : h_in // 4, : w_in // 4], MASK_LOGIT, atol=1e-4)
    assert (logits[0, -(-h_in // 4) :] == -MASK_LOGIT).all()  # padding below
    assert (logits[0, :, -(-w_in // 4) :] == -MASK_LOGIT).all()  # padding right
    assert (mask_to_logits(~full, predictor) == -MASK_LOGIT).all()


@pytest.mark.parametrize("hw", SIZES)
def test_postprocess_gives_the_mask_back(hw):
    predictor = predictor_for(OracleSam(256), hw)
    cell = 4 * max(hw) / 256  # one low-res cell in original pixels
    for name, mask in shapes(*hw).items():
        back = round_trip(predictor, mask)
        assert iou(back, mask) >= 0.9, (name, iou(back, mask))
        # errors only along the border: never more than one cell away from it
        border = mask ^ ndimage.binary_erosion(mask)
        near = ndimage.binary_dilation(border, iterations=int(cell) + 1)
        assert not ((back ^ mask) & ~near).any(), name


def test_postprocess_of_the_real_model_gives_the_mask_back():
    from sam_factory import TINY_VIT_B

    from napari_sam.model import build_model

    model = build_model(TINY_VIT_B).eval()
    for hw in [(60, 90), (256, 256), (300, 170)]:
        predictor = predictor_for(model, hw)
        for name, mask in shapes(*hw).items():
            assert iou(round_trip(predictor, mask), mask) >= 0.9, (hw, name)


@pytest.mark.parametrize("hw", [(64, 100), (100, 64)])
def test_a_straight_border_comes_back_within_a_pixel(hw):
    """Half-planes at every column/row: an off-by-half-cell or a mis-scaled grid moves
    the border by more than a pixel somewhere."""
    predictor = predictor_for(OracleSam(256), hw)
    h, w = hw
    cols = np.arange(3, w - 3)
    left = np.arange(w)[None, None, :] < cols[:, None, None]  # (n, 1, W): x < c
    found = round_trip(predictor, *np.broadcast_to(left, (len(cols), h, w))).sum(2)  # (n, H)
    assert np.abs(found - cols[:, None]).max() <= 1
    rows = np.arange(3, h - 3)
    top = np.arange(h)[None, :, None] < rows[:, None, None]  # (n, H, 1): y < r
    found = round_trip(predictor, *np.broadcast_to(top, (len(rows), h, w))).sum(1)  # (n, W)
    assert np.abs(found - rows[:, None]).max() <= 1


@pytest.mark.parametrize("hw", [(60, 90), (90, 60), (700, 400)])
def test_round_trip_is_stable_and_agrees_with_the_models_own_logits(hw):
    """A mask that came out of the model converts back to (the sign pattern of) the logits
    it came from, and converting a round-tripped mask again changes it no more."""
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros(hw, np.uint8)
    img[np.hypot(yy - 0.5 * h, xx - 0.6 * w) <= 0.3 * min(h, w)] = 200
    predictor = predictor_for(OracleSam(256), hw)
    predictor.set_image(img)
    masks, _, low = predictor.predict(np.array([[0.6 * w, 0.5 * h]]), np.array([1]),
                                      multimask_output=False)
    ours = mask_to_logits(masks[0], predictor)
    agree = np.mean((ours > 0) == (low > 0))
    assert agree >= 0.995, agree
    once = round_trip(predictor, masks[0])
    twice = round_trip(predictor, once)
    assert iou(once, masks[0]) >= 0.97 and iou(twice, once) >= 0.99


@pytest.mark.parametrize("hw", [(40, 120), (120, 40), (60, 90)])
def test_a_mask_prompt_alone_selects_its_object_with_the_oracle(hw):
    """The same conversion as a prompt: objects next to the padding on non-square images."""
    h, w = hw
    img = np.zeros(hw, np.uint8)
    truth = {}
    for k, (r0, c0, value) in enumerate([(0.1, 0.1, 60), (0.6, 0.6, 130), (0.6, 0.1, 200)]):
        obj = np.zeros(hw, bool)
        obj[int(r0 * h) : int((r0 + 0.4) * h), int(c0 * w) : int((c0 + 0.4) * w)] = True
        img[obj], truth[k] = value, obj
    predictor = predictor_for(OracleSam(256), hw)
    predictor.set_image(img)
    for k, obj in truth.items():
        cols = np.flatnonzero(obj.any(0))
        rough = obj.copy()
        rough[:, (cols[0] + cols[-1]) // 2 :] = False  # the object's left half only
        masks, _, _ = predictor.predict(mask_input=mask_to_logits(rough, predictor),
                                        multimask_output=False)
        rows = np.flatnonzero(obj.any(1))
        click = [[(cols[0] + cols[-1]) / 2, (rows[0] + rows[-1]) / 2]]
        clicked, _, _ = predictor.predict(np.array(click), np.array([1]), multimask_output=False)
        # exactly the object a click selects (the oracle's resampling blurs thin objects)
        assert iou(masks[0], clicked[0]) == 1.0 and iou(masks[0], obj) >= 0.8, k


def test_bad_mask_shape_is_a_clear_error():
    predictor = predictor_for(OracleSam(256), (60, 90))
    with pytest.raises(ValueError, match=r"expected a mask of shape \(60, 90\)"):
        mask_to_logits(np.zeros((90, 60), bool), predictor)
