"""Segment everything on random weights: the reference generator's masks, record by record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_shim import import_segment_anything
from test_automatic_oracle import assert_same_records

from napari_sam.engine.automatic import SamAutomaticMaskGenerator


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference Sam, ours) with identical random weights; seeded so that thresholds taken
    from the score distribution are reproducible."""
    from sam_factory import TINY_VIT_B, reference_sam, save_checkpoint

    from napari_sam import build_sam

    import_segment_anything()
    torch.manual_seed(0)
    ref = reference_sam(TINY_VIT_B, seed=4)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("amg") / "tiny.pth")
    return ref, build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:180, 0:300]
    img = np.stack([(xx * 0.8) % 255, (yy * 1.3) % 255, ((xx + yy) * 0.5) % 255], axis=-1)
    img[40:120, 60:160] = (200, 30, 30)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def both(models, image, **params):
    sa = import_segment_anything()
    ref_model, ours = models
    ref = sa.SamAutomaticMaskGenerator(ref_model, **params).generate(image)
    return SamAutomaticMaskGenerator(ours, **params).generate(image), ref


@pytest.fixture(scope="module")
def unfiltered(models, image):
    """Every mask of a 6x6 grid, no filter, no NMS (box IoU is never > 1)."""
    return both(models, image, points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0)


def test_every_mask_matches_without_filters(unfiltered):
    ours, ref = unfiltered
    assert len(ref) == 6 * 6 * 3
    assert_same_records(ours, ref)


def test_filters_in_the_middle_of_the_distribution(models, image, unfiltered):
    """Thresholds at the quantiles of the scores: both filters and NMS remove masks."""
    _, ref = unfiltered
    stability = np.array([r["stability_score"] for r in ref])
    ious = np.array([r["predicted_iou"] for r in ref])
    params = dict(
        points_per_side=6,
        points_per_batch=10,  # batches that do not divide the grid
        pred_iou_thresh=max(1e-3, float(np.quantile(ious, 0.3))),
        stability_score_thresh=float(np.quantile(stability[stability > 0], 0.4)),
        box_nms_thresh=0.95,
    )
    ours, ref = both(models, image, **params)
    assert 0 < len(ref) < 0.5 * len(stability)
    assert_same_records(ours, ref)


def test_defaults_and_crop_layers(models, image):
    for params in (
        dict(points_per_side=6),
        dict(points_per_side=4, crop_n_layers=1, pred_iou_thresh=0, stability_score_thresh=0,
             box_nms_thresh=1.0, crop_nms_thresh=0.8, output_mode="uncompressed_rle"),
    ):
        ours, ref = both(models, image, **params)
        if params.get("output_mode"):
            from napari_sam.engine.mask_set import rle_to_mask

            for records in (ours, ref):
                for r in records:
                    r["segmentation"] = rle_to_mask(r["segmentation"])
        assert_same_records(ours, ref)
