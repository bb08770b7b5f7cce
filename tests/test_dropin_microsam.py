"""micro-sam's prompt functions and its precomputed-embeddings 3D path, with our predictor.

micro-sam (test-only, see scripts/setup_env.sh --testing) is a real client of
``segment_anything.SamPredictor``: it computes embeddings with the predictor's model, then
sets each slice's features straight onto the predictor (``predictor.features = …``) before
predicting. Everything runs twice, with the reference predictor and with ours, on identical
random weights: masks IoU >= 0.99, scores within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_shim import import_segment_anything
from test_dropin_api import iou, scene


def import_micro_sam():
    import_segment_anything()  # the torchvision shim first
    try:
        from micro_sam import multi_dimensional_segmentation, prompt_based_segmentation, util
    except ImportError as exc:
        pytest.skip(f"micro-sam is not installed (test-only: scripts/setup_env.sh --testing): {exc}")
    return prompt_based_segmentation, util, multi_dimensional_segmentation


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    """(reference SamPredictor, ours) on a 1024-input model: micro-sam's mask prompts are
    256x256 logits, the official models' low-res size."""
    from sam_factory import TINY_VIT_B_1024, reference_sam, save_checkpoint

    from napari_sam import SamPredictor, build_sam

    sa = import_segment_anything()
    torch.manual_seed(0)
    ref = reference_sam(TINY_VIT_B_1024, seed=6)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("microsam") / "tiny.pth")
    ours = build_sam(TINY_VIT_B_1024, checkpoint=path, device="cpu", precision="fp32")
    return sa.SamPredictor(ref), SamPredictor(ours)


@pytest.fixture(scope="module")
def volume():
    """(3, 200, 260) uint8 grayscale stack whose slices differ."""
    return np.stack([scene(200, 260, 20 + k).mean(axis=-1).astype(np.uint8) for k in range(3)])


@pytest.fixture(scope="module")
def embeddings(predictors, volume):
    """micro-sam's precomputed 3D embeddings, each computed with its own predictor."""
    _, util, _ = import_micro_sam()
    ref, ours = predictors
    emb_ref = util.precompute_image_embeddings(ref, volume, ndim=3, verbose=False)
    emb_ours = util.precompute_image_embeddings(ours, volume, ndim=3, verbose=False)
    return emb_ref, emb_ours


def assert_same(ours, ref):
    (m_ours, s_ours, lr_ours), (m_ref, s_ref, lr_ref) = ours, ref
    assert m_ours.shape == m_ref.shape
    for a, b in zip(m_ours.reshape(-1, *m_ours.shape[-2:]), m_ref.reshape(-1, *m_ref.shape[-2:])):
        assert iou(a, b) >= 0.99
    np.testing.assert_allclose(s_ours, s_ref, atol=1e-4)
    np.testing.assert_allclose(lr_ours, lr_ref, atol=1e-3 * np.abs(lr_ref).max())


def test_precomputed_embeddings_match(embeddings):
    emb_ref, emb_ours = embeddings
    assert emb_ours["features"].shape == emb_ref["features"].shape
    assert tuple(emb_ours["input_size"]) == tuple(emb_ref["input_size"])
    assert tuple(emb_ours["original_size"]) == tuple(emb_ref["original_size"])
    f_ours, f_ref = emb_ours["features"], emb_ref["features"]
    assert np.linalg.norm(f_ours - f_ref) <= 1e-4 * np.linalg.norm(f_ref)


def test_prompt_functions_slice_by_slice(predictors, embeddings, volume):
    """segment_from_points / _box / _mask on each slice of the precomputed stack."""
    pbs, _, _ = import_micro_sam()
    ref, ours = predictors
    emb_ref, emb_ours = embeddings
    points_yx, labels = np.array([[100, 120], [60, 200]]), np.array([1, 0])
    box_yx = np.array([40, 50, 170, 220])  # micro-sam's boxes: (y0, x0, y1, x1)
    prompt_mask = np.zeros(volume.shape[1:], dtype=np.uint8)
    prompt_mask[70:140, 80:190] = 1
    per_slice = []
    for z in range(len(volume)):
        calls = {
            "one point": lambda p, e: pbs.segment_from_points(
                p, points_yx[:1], labels[:1], image_embeddings=e, i=z, return_all=True),
            "points": lambda p, e: pbs.segment_from_points(
                p, points_yx, labels, image_embeddings=e, i=z, multimask_output=True, return_all=True),
            "box": lambda p, e: pbs.segment_from_box(p, box_yx, image_embeddings=e, i=z, return_all=True),
            "mask as box and mask": lambda p, e: pbs.segment_from_mask(
                p, prompt_mask, image_embeddings=e, i=z, return_all=True),
            "mask as points and mask": lambda p, e: pbs.segment_from_mask(
                p, prompt_mask, image_embeddings=e, i=z, use_box=False, use_points=True, return_all=True),
            "mask as box, logits": lambda p, e: pbs.segment_from_mask(
                p, prompt_mask, image_embeddings=e, i=z, use_mask=False, return_all=True,
                return_logits=True),
        }
        results = {}
        for name, call in calls.items():
            expected = call(ref, emb_ref)
            if name.endswith("logits"):  # logits out: compare them as masks at 0
                got = call(ours, emb_ours)
                assert_same((got[0] > 0, *got[1:]), (expected[0] > 0, *expected[1:]))
            else:
                assert_same(call(ours, emb_ours), expected)
            results[name] = expected[0]
        per_slice.append(results)
    # the slices give different masks: a predictor decoding stale features would fail above
    assert iou(per_slice[0]["one point"][0], per_slice[1]["one point"][0]) < 0.95
    assert iou(per_slice[1]["box"][0], per_slice[2]["box"][0]) < 0.95


@pytest.mark.parametrize("projection", ["mask", "points_and_mask"])
def test_segment_mask_in_volume(predictors, embeddings, volume, projection):
    """micro-sam's 3D propagation of one object from the middle slice up and down."""
    pbs, _, mds = import_micro_sam()
    ref, ours = predictors
    emb_ref, emb_ours = embeddings
    start = pbs.segment_from_box(ref, np.array([40, 50, 170, 220]), image_embeddings=emb_ref, i=1)[0]
    results = []
    for predictor, emb in ((ref, emb_ref), (ours, emb_ours)):
        seg = np.zeros(volume.shape, dtype=np.uint8)
        seg[1] = start
        seg, (z_min, z_max) = mds.segment_mask_in_volume(
            seg, predictor, emb, segmented_slices=np.array([1]), stop_lower=False,
            stop_upper=False, iou_threshold=0.0, projection=projection,
        )
        results.append((seg, z_min, z_max))
    (seg_ref, *range_ref), (seg_ours, *range_ours) = results
    assert range_ours == range_ref == [0, 2]
    for z in range(len(volume)):
        assert iou(seg_ours[z] > 0, seg_ref[z] > 0) >= 0.99


def test_2d_embeddings_and_points(predictors, volume):
    """The 2D path: micro-sam runs ``set_image`` and reads the predictor's state back."""
    pbs, util, _ = import_micro_sam()
    ref, ours = predictors
    image = volume[2]
    emb_ref = util.precompute_image_embeddings(ref, image, ndim=2, verbose=False)
    emb_ours = util.precompute_image_embeddings(ours, image, ndim=2, verbose=False)
    points_yx, labels = np.array([[120, 90]]), np.array([1])
    assert_same(
        pbs.segment_from_points(ours, points_yx, labels, image_embeddings=emb_ours, return_all=True),
        pbs.segment_from_points(ref, points_yx, labels, image_embeddings=emb_ref, return_all=True),
    )
