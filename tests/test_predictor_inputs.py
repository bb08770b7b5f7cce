"""Microscopy inputs to the predictor: dtypes, shapes, bad values, separable embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam import SamPredictor
from napari_sam.engine.image import to_rgb_uint8
from oracle import OracleSam


def blobs(dtype=np.uint16, shape=(120, 200), value=1000):
    img = np.zeros(shape, dtype=dtype)
    img[20:60, 30:90] = value
    img[70:110, 120:190] = value * 3
    return img


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_click_segments_object_for_every_dtype(dtype):
    img = blobs(dtype, value=60 if dtype == np.uint8 else 1000)
    p = SamPredictor(OracleSam(256))
    p.set_image(img)
    masks, scores, low_res = p.predict(np.array([[60.0, 40.0]]), np.array([1]))
    assert masks.shape == (3, 120, 200) and low_res.shape == (3, 64, 64)
    assert iou(masks[np.argmax(scores)], img == img[40, 60]) >= 0.95


def test_rgb_rgba_and_single_channel_agree():
    gray = blobs(np.uint8, value=60)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full_like(gray[..., None], 255)], axis=-1)
    for img in (gray[..., None], rgb, rgba):
        np.testing.assert_array_equal(to_rgb_uint8(img), rgb)


def test_bool_image():
    out = to_rgb_uint8(blobs(np.uint8, value=60) > 0)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 255}


def test_robust_normalisation_ignores_hot_pixels():
    img = blobs(np.uint16, value=1000).astype(np.float32)
    img[0, 0] = 1e9  # one hot pixel
    out = to_rgb_uint8(img)[..., 0]
    assert out[40, 60] > 50  # the objects keep their contrast


def test_contrast_limits_map_linearly():
    img = np.array([[0, 500, 1000, 2000]], dtype=np.uint16)
    out = to_rgb_uint8(img, contrast_limits=(500, 1000))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 0, 255, 255])
    out = to_rgb_uint8(img, contrast_limits=(0, 2000))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 64, 128, 255])


def test_nan_and_constant_images():
    img = np.full((10, 10), np.nan, dtype=np.float32)
    img[2:5, 2:5] = 3.0
    img[6:8, 6:8] = 5.0
    out = to_rgb_uint8(img)[..., 0]
    assert out[0, 0] == 0 and out[6, 6] == 255
    assert to_rgb_uint8(np.full((5, 5), 7.0)).max() == 0  # constant: no crash


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 10)), "non-empty"),
        (np.zeros((4, 5, 6, 7)), "shape"),
        (np.zeros((4, 5, 2)), "shape"),
        (np.zeros(5), "shape"),
        (np.full((5, 5), np.nan), "finite"),
        (np.zeros((5, 5), dtype=complex), "real-valued"),
        (np.array([["a"]]), "real-valued"),
    ],
)
def test_bad_images_raise_clear_errors(bad, match):
    p = SamPredictor(OracleSam(256))
    with pytest.raises(ValueError, match=match):
        p.set_image(bad)
    assert not p.is_image_set


def test_bad_prompts_raise_clear_errors():
    p = SamPredictor(OracleSam(256))
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(np.array([[1.0, 1.0]]), np.array([1]))
    p.set_image(blobs())
    with pytest.raises(ValueError, match="together"):
        p.predict(point_coords=np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        p.predict(np.array([1.0, 1.0]), np.array([1]))
    with pytest.raises(ValueError, match="finite"):
        p.predict(np.array([[np.nan, 1.0]]), np.array([1]))
    with pytest.raises(ValueError, match="box"):
        p.predict(box=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="mask_input"):
        p.predict(np.array([[1.0, 1.0]]), np.array([1]), mask_input=np.zeros((1, 256, 256)))
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(blobs(), image_format="HSV")


def test_embedding_round_trip_needs_no_encoder_call():
    model = OracleSam(256)
    p = SamPredictor(model)
    img = blobs()
    emb = p.encode_image(img)
    assert not p.is_image_set  # encode_image leaves the predictor alone
    other = SamPredictor(model)
    other.set_embedding(emb)
    assert model.encode_calls == 1
    m1 = other.predict(np.array([[60.0, 40.0]]), np.array([1]))[0]
    p.set_image(img)
    m2 = p.predict(np.array([[60.0, 40.0]]), np.array([1]))[0]
    np.testing.assert_array_equal(m1, m2)
    assert other.get_embedding() is emb


def test_embedding_from_other_weights_is_refused():
    emb = SamPredictor(OracleSam(256)).encode_image(blobs())
    other = OracleSam(256)
    other.signature = "vit_b:deadbeef"
    with pytest.raises(ValueError, match="embedding made by"):
        SamPredictor(other).set_embedding(emb)


@pytest.mark.parametrize("shape", [(50, 80), (700, 60), (3000, 4000)])
def test_tiny_tall_and_large_images(shape):
    img = np.zeros(shape, np.uint8)
    r, c = shape[0] // 2, shape[1] // 2
    img[r - shape[0] // 5 : r + shape[0] // 5, c - shape[1] // 5 : c + shape[1] // 5] = 90
    p = SamPredictor(OracleSam(1024))  # SAM's real input size
    p.set_image(img)
    masks, scores, _ = p.predict(np.array([[c, r]], dtype=float), np.array([1]), multimask_output=False)
    assert masks.shape == (1, *shape)
    assert iou(masks[0], img == 90) >= 0.9


# ---------------------------------------------------------------- prompt validation (issue 8)
def _predictor_with_blobs():
    p = SamPredictor(OracleSam(256))
    img = blobs()
    p.set_image(img)
    return p, img


@pytest.mark.parametrize(
    "box",
    [[30, 20, 90, 60], [90, 20, 30, 60], [30, 60, 90, 20], [90, 60, 30, 20]],
    ids=["ordered", "x-reversed", "y-reversed", "both-reversed"],
)
def test_box_corners_in_any_order_give_the_same_mask(box):
    """A box dragged right-to-left or bottom-to-top (x1 < x0, y1 < y0) used to give another
    (here: empty) mask; corners are sorted per axis as the widget does."""
    p, img = _predictor_with_blobs()
    truth = img == img[40, 60]
    masks, scores, low_res = p.predict(box=np.array(box, float), multimask_output=False)
    assert iou(masks[0], truth) >= 0.95
    expected = p.predict(box=np.array([30.0, 20, 90, 60]), multimask_output=False)
    np.testing.assert_array_equal(masks, expected[0])
    np.testing.assert_array_equal(low_res, expected[2])
    # the batched torch entry point too (boxes already in model-input pixels)
    boxes = torch.as_tensor(p.transform.apply_boxes(np.array(box, float), p.original_size), dtype=torch.float)
    torch_masks = p.predict_torch(None, None, boxes, multimask_output=False)[0]
    np.testing.assert_array_equal(torch_masks[0].numpy(), expected[0])


def test_reversed_box_with_random_weights_matches_ordered_box(tiny_sam):
    """A real (random-weight) decoder encodes the two corners differently: without sorting,
    a reversed box gives other logits."""
    p = SamPredictor(tiny_sam)
    p.set_image(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    ordered = p.predict(box=np.array([[20.0, 10, 80, 70]]))
    for box in ([80.0, 10, 20, 70], [20.0, 70, 80, 10], [80.0, 70, 20, 10]):
        got = p.predict(box=np.array(box))
        for a, b in zip(got, ordered):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "labels",
    [[2], [3], [-2], [0.5], [np.nan], ["1"], [None], np.array([1 + 1j])],
    ids=["2", "3", "-2", "0.5", "nan", "str", "None", "complex"],
)
def test_point_labels_outside_minus_one_zero_one_are_refused(labels):
    p, _ = _predictor_with_blobs()
    with pytest.raises(ValueError, match=r"expected point_labels in .*got"):
        p.predict(np.array([[60.0, 40.0]]), np.array(labels, dtype=None))


@pytest.mark.parametrize("labels", [[1, 0, -1], [True, False, False], [1.0, 0.0, -1.0], np.array([1, 0, -1], np.int8)])
def test_valid_point_labels_are_accepted(labels):
    p, img = _predictor_with_blobs()
    coords = np.array([[60.0, 40.0], [150.0, 90.0], [0.0, 0.0]])
    masks, scores, _ = p.predict(coords, np.asarray(labels))
    assert iou(masks[np.argmax(scores)], img == img[40, 60]) >= 0.95


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("everywhere", [True, False])
def test_non_finite_mask_input_is_refused(bad_value, everywhere):
    p, _ = _predictor_with_blobs()
    mask = np.zeros((1, *p.low_res_size), np.float32)
    if everywhere:
        mask[:] = bad_value
    else:
        mask[0, 10, 10] = bad_value
    with pytest.raises(ValueError, match=r"expected finite mask_input logits, got \d+ of 4096 values"):
        p.predict(np.array([[60.0, 40.0]]), np.array([1]), mask_input=mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(box=np.array([1.0, 2.0, np.inf, 4.0])), "expected finite box"),
        (dict(box=np.array([np.nan, 2.0, 3.0, 4.0])), "expected finite box"),
        (dict(box=np.array(["a", "b", "c", "d"])), "expected real numbers for box"),
        (dict(point_coords=np.array([[1.0, -np.inf]]), point_labels=np.array([1])), "expected finite point_coords"),
        (dict(point_coords=np.array([["x", "y"]]), point_labels=np.array([1])), "expected real numbers for point_coords"),
        (dict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]),
              mask_input=np.full((1, 64, 64), "a")), "expected real numbers for mask_input"),
    ],
)
def test_non_finite_or_non_numeric_prompts_are_refused(kwargs, match):
    p, _ = _predictor_with_blobs()
    with pytest.raises(ValueError, match=match):
        p.predict(**kwargs)


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (1, 2100, 3)])
def test_too_thin_image_says_what_is_wrong(shape):
    """Its short side rounds to 0 pixels at SAM's input size: used to be PIL's "height and
    width must be > 0"."""
    p = SamPredictor(OracleSam(1024))
    with pytest.raises(ValueError) as info:
        p.set_image(np.zeros(shape, np.uint8))
    msg = str(info.value)
    assert f"got shape ({shape[0]}, {shape[1]})" in msg
    assert "input size 1024" in msg and "too thin" in msg and "at least 2 pixels" in msg
    assert not p.is_image_set


def test_thinnest_resizable_image_works():
    p = SamPredictor(OracleSam(1024))
    img = np.zeros((2, 3000), np.uint8)
    img[:, 1000:2000] = 90
    p.set_image(img)
    masks, _, _ = p.predict(np.array([[1500.0, 1.0]]), np.array([1]), multimask_output=False)
    assert masks.shape == (1, 2, 3000)
