"""The segment_anything compatibility surface (napari_sam.compat): registry, transforms,
Sam.forward, the predictor's public attributes and precomputed features set from outside."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from reference_shim import import_segment_anything


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: a gradient, a dozen flat ellipses, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 0.5) % 255, (yy * 0.7) % 255, ((xx + yy) * 0.3) % 255], -1)
    for _ in range(12):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 20, h / 6), rng.uniform(w / 20, w / 6)
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- registry


def test_registry_has_the_reference_keys_and_builders():
    import napari_sam
    from napari_sam.model import MODEL_CONFIGS

    sa = import_segment_anything()
    registry = napari_sam.sam_model_registry
    assert set(sa.sam_model_registry) <= set(registry)
    assert {"default", "vit_h", "vit_l", "vit_b", "vit_t"} <= set(registry)
    assert set(MODEL_CONFIGS) <= set(registry)
    assert registry["default"] is registry["vit_h"] is napari_sam.build_sam_vit_h
    for name, build in registry.items():
        params = inspect.signature(build).parameters
        assert list(params) == ["checkpoint"] and params["checkpoint"].default is None, name


def test_registry_vit_b_equals_the_reference(tmp_path):
    """Random init (checkpoint=None, seeded) and a checkpoint file both give the
    reference's weights; float32, CPU, eval mode, as the reference's builder."""
    import napari_sam

    sa = import_segment_anything()
    torch.manual_seed(0)
    ref = sa.sam_model_registry["vit_b"]()
    torch.manual_seed(0)
    ours = napari_sam.sam_model_registry["vit_b"]()
    ref_state = ref.state_dict()

    def assert_same_weights(model):
        state = model.state_dict()
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            assert torch.equal(state[key], value), key
        assert not model.training and model.device.type == "cpu"
        assert model.encoder_dtype is None and model.decoder_dtype is None
        assert all(p.dtype == torch.float32 for p in model.parameters())

    assert_same_weights(ours)
    del ours
    path = tmp_path / "vit_b.pth"
    torch.save(ref_state, path)
    assert_same_weights(napari_sam.sam_model_registry["vit_b"](checkpoint=str(path)))
    assert_same_weights(napari_sam.sam_model_registry["vit_b"](path))  # positional, as the reference


def test_registry_is_fp32_where_build_sam_picks_bf16(monkeypatch, tiny_reference_and_checkpoint):
    """On a CPU with native bf16, ``build_sam``'s "auto" picks bf16; the registry builders
    give the reference's float32 numbers regardless."""
    from sam_factory import TINY_VIT_B

    from napari_sam import build_sam, compat
    from napari_sam.engine import device

    ref, path = tiny_reference_and_checkpoint
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert build_sam(TINY_VIT_B, checkpoint=path, device="cpu").encoder_dtype == torch.bfloat16
    ours = compat._builder(TINY_VIT_B)(checkpoint=path)
    assert ours.encoder_dtype is None and ours.device.type == "cpu"
    x = torch.rand(1, 3, 256, 256) * 255
    with torch.no_grad():
        expected = ref.image_encoder(ref.preprocess(x))
    got = ours.encode(ours.preprocess(x))
    assert float((got - expected).norm() / expected.norm()) <= 1e-5


# ---------------------------------------------------------------------- transforms


def test_resize_longest_side_matches_the_reference():
    from napari_sam.utils.transforms import ResizeLongestSide

    sa_transforms = pytest.importorskip("segment_anything.utils.transforms")
    rng = np.random.default_rng(0)
    for target in (1024, 256):
        ref, ours = sa_transforms.ResizeLongestSide(target), ResizeLongestSide(target)
        for shape in [(180, 300, 3), (300, 180, 3), (77, 77, 3), (1200, 1800, 3), (50, 90)]:
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            np.testing.assert_array_equal(ours.apply_image(image), ref.apply_image(image))
            size = shape[:2]
            coords = rng.uniform(0, 300, (5, 2))
            np.testing.assert_array_equal(ours.apply_coords(coords, size), ref.apply_coords(coords, size))
            boxes = rng.uniform(0, 300, (3, 4))
            np.testing.assert_array_equal(ours.apply_boxes(boxes, size), ref.apply_boxes(boxes, size))
            coords_t = torch.from_numpy(rng.uniform(0, 300, (2, 5, 2))).float()
            assert torch.equal(ours.apply_coords_torch(coords_t, size), ref.apply_coords_torch(coords_t, size))
            boxes_t = torch.tensor([[10, 20, 100, 80], [0, 0, 5, 5]])  # int, as the notebook's
            assert torch.equal(ours.apply_boxes_torch(boxes_t, size), ref.apply_boxes_torch(boxes_t, size))
            assert ours.get_preprocess_shape(*size, target) == ref.get_preprocess_shape(*size, target)
        for shape in [(1, 1, 300, 200), (1, 1, 256, 256), (2, 3, 40, 70), (1, 3, 64, 48)]:
            image = torch.rand(shape)
            assert torch.equal(ours.apply_image_torch(image), ref.apply_image_torch(image)), shape
    assert ResizeLongestSide.get_preprocess_shape(600, 900, 1024) == (683, 1024)  # static


# ---------------------------------------------------------------------- Sam.forward


def test_calling_the_model_matches_the_reference(tiny_reference_and_checkpoint, tiny_sam):
    """``sam(batched_input, multimask_output)``: two images, every prompt kind."""
    from napari_sam.utils.transforms import ResizeLongestSide

    ref, _ = tiny_reference_and_checkpoint
    transform = ResizeLongestSide(256)
    images = [scene(180, 300, 1), scene(240, 160, 2)]
    low_res_prompt = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    batched = []
    for image, prompts in zip(
        images,
        [
            dict(point_coords=[[[120.0, 70.0], [30, 40]], [[200, 100], [10, 10]]], point_labels=[[1, 0], [1, -1]]),
            dict(boxes=[[20.0, 30, 100, 200], [5, 5, 150, 90]], point_coords=[[[50, 60]], [[70, 20]]],
                 point_labels=[[1], [0]]),
        ],
    ):
        size = image.shape[:2]
        record = {
            "image": torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).contiguous(),
            "original_size": size,
            "point_coords": transform.apply_coords_torch(torch.tensor(prompts["point_coords"]), size),
            "point_labels": torch.tensor(prompts["point_labels"]),
        }
        if "boxes" in prompts:
            record["boxes"] = transform.apply_boxes_torch(torch.tensor(prompts["boxes"]), size)
        batched.append(record)
    batched.append({**batched[0], "mask_inputs": low_res_prompt})
    for multimask in (True, False):
        expected = ref(batched, multimask_output=multimask)
        got = tiny_sam(batched, multimask_output=multimask)
        assert len(got) == len(expected) == 3
        for g, e in zip(got, expected):
            assert set(g) == set(e) == {"masks", "iou_predictions", "low_res_logits"}
            assert g["masks"].shape == e["masks"].shape and g["masks"].dtype == torch.bool
            for a, b in zip(g["masks"].flatten(0, 1).numpy(), e["masks"].flatten(0, 1).numpy()):
                assert iou(a, b) >= 0.99
            np.testing.assert_allclose(g["iou_predictions"], e["iou_predictions"], atol=1e-4)
            lr_g, lr_e = g["low_res_logits"], e["low_res_logits"]
            assert float((lr_g - lr_e).norm() / lr_e.norm()) <= 1e-4
            assert not g["masks"].is_inference()  # ordinary tensors, as the reference's


# ---------------------------------------------------------------------- predictor


@pytest.fixture(scope="module")
def predictors(tiny_reference_and_checkpoint, tiny_sam):
    from napari_sam import SamPredictor

    sa = import_segment_anything()
    ref, _ = tiny_reference_and_checkpoint
    return sa.SamPredictor(ref), SamPredictor(tiny_sam)


PUBLIC = ("model", "transform", "device", "features", "original_size", "input_size",
          "orig_h", "orig_w", "input_h", "input_w", "is_image_set")


def test_predictor_has_the_reference_attributes(predictors):
    ref, ours = predictors
    ref.reset_image(), ours.reset_image()
    for name in ("features", "orig_h", "orig_w", "input_h", "input_w"):
        assert getattr(ours, name) is None is getattr(ref, name), name
    assert ours.original_size is None and ours.input_size is None  # the reference has none yet
    assert ours.is_image_set is False is ref.is_image_set
    assert ours.device == ref.device
    for method in ("set_image", "set_torch_image", "predict", "predict_torch", "get_image_embedding", "reset_image"):
        assert callable(getattr(ours, method))
    image = scene(180, 300, 0)
    ref.set_image(image), ours.set_image(image)
    for name in PUBLIC:
        assert hasattr(ref, name) and hasattr(ours, name), name
    assert ours.original_size == tuple(ref.original_size) == (180, 300)
    assert ours.input_size == tuple(ref.input_size) == (154, 256)
    assert (ours.orig_h, ours.orig_w, ours.input_h, ours.input_w) == (180, 300, 154, 256)
    features = ours.features
    assert isinstance(features, torch.Tensor) and not features.is_inference()
    assert not features.requires_grad and features.shape == ref.features.shape
    assert float((features - ref.features).norm() / ref.features.norm()) <= 1e-4
    features.mul_(1.0)  # in place: fails on an inference tensor
    (features * torch.ones((), requires_grad=True)).sum().backward()  # autograd on it works
    masks, scores, low_res = ours.predict_torch(
        torch.tensor([[[100.0, 60.0]]]), torch.tensor([[1]]), multimask_output=False
    )
    assert not any(t.is_inference() for t in (masks, scores, low_res))
    ours.reset_image()
    assert ours.features is None and ours.orig_h is None and not ours.is_image_set


@pytest.fixture(scope="module")
def stack_features(predictors):
    """Three slices that differ, each encoded by the reference: (features, sizes)."""
    ref, _ = predictors
    out = []
    for k in range(3):
        ref.set_image(scene(180, 300, 10 + k))
        out.append((ref.features.clone(), tuple(ref.original_size), tuple(ref.input_size)))
    return out


def set_precomputed(predictor, features, original_size, input_size):
    """What micro-sam's ``util.set_precomputed`` does."""
    predictor.features = features.clone()
    predictor.original_size = original_size
    predictor.input_size = input_size
    predictor.is_image_set = True


def test_precomputed_features_set_slice_by_slice(predictors, stack_features):
    """micro-sam sets each slice's features straight onto the predictor and predicts: every
    slice must be decoded against its own features (the stale per-image decoder cache gave
    slice 0's masks for slices 1 and 2)."""
    ref, ours = predictors
    ours.set_image(scene(180, 300, 99))  # a decoder cache for another image exists
    ours.predict(np.array([[10.0, 10.0]]), np.array([1]))
    prompt = dict(point_coords=np.array([[150.0, 90.0]]), point_labels=np.array([1]))
    ref_masks = []
    for features, original_size, input_size in stack_features:
        set_precomputed(ref, features, original_size, input_size)
        set_precomputed(ours, features, original_size, input_size)
        for kwargs in (prompt, dict(box=np.array([40.0, 30, 220, 150]))):
            m_ref, s_ref, lr_ref = ref.predict(**kwargs)
            m_ours, s_ours, lr_ours = ours.predict(**kwargs)
            for a, b in zip(m_ours, m_ref):
                assert iou(a, b) >= 0.99
            np.testing.assert_allclose(s_ours, s_ref, atol=1e-4)
        ref_masks.append(ref.predict(**prompt)[0])
    # the slices do give different masks (else this test could not see a stale cache)
    assert min(iou(ref_masks[0][i], ref_masks[k][i]) for k in (1, 2) for i in range(3)) < 0.95


def test_features_changed_in_place_or_sizes_assigned(predictors, stack_features):
    """Caches also follow in-place changes of ``features`` and a new ``original_size``."""
    ref, ours = predictors
    prompt = dict(point_coords=np.array([[150.0, 90.0]]), point_labels=np.array([1]))
    (f0, size, input_size), (f1, _, _) = stack_features[0], stack_features[1]
    set_precomputed(ours, f0, size, input_size)
    ours.predict(**prompt)
    ours.features.copy_(f1)  # in place: same tensor object
    set_precomputed(ref, f1, size, input_size)
    m_ref, s_ref, _ = ref.predict(**prompt)
    m_ours, s_ours, _ = ours.predict(**prompt)
    assert all(iou(a, b) >= 0.99 for a, b in zip(m_ours, m_ref))
    np.testing.assert_allclose(s_ours, s_ref, atol=1e-4)
    # a client keeping the features but changing the sizes (a crop of the same image size)
    ours.original_size, ref.original_size = (160, 267), (160, 267)
    m_ref, _, _ = ref.predict(**prompt)
    m_ours, _, _ = ours.predict(**prompt)
    assert m_ours.shape == m_ref.shape == (3, 160, 267)
    assert all(iou(a, b) >= 0.99 for a, b in zip(m_ours, m_ref))
    assert ours.get_embedding().original_size == (160, 267)
