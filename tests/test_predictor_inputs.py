"""Microscopy inputs to the predictor: dtypes, shapes, bad values, separable embeddings."""

from __future__ import annotations

import numpy as np
import pytest

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
