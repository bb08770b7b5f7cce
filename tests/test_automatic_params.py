"""Segment everything: parameters checked up front, small and thin images (issue 8, item 10)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oracle import OracleSam
from test_automatic_oracle import FastOracle

from napari_sam.engine.amg_utils import generate_crop_boxes
from napari_sam.engine.automatic import MAX_CROP_LAYERS, SamAutomaticMaskGenerator, run_to_end


@pytest.fixture(scope="module")
def oracle():
    return OracleSam(image_size=256)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop_n_layers=5), r"crop_n_layers an integer in \[0, 3\], got 5 \(1365 encoded images\).*85"),
        (dict(crop_n_layers=-1), r"crop_n_layers an integer in \[0, 3\], got -1"),
        (dict(crop_n_layers=1.5), r"crop_n_layers an integer in \[0, 3\], got 1.5"),
        (dict(crop_n_layers=True), r"crop_n_layers an integer"),
        (dict(crop_overlap_ratio=1.0), r"crop_overlap_ratio a finite number in \[0, 1\).*got 1.0"),
        (dict(crop_overlap_ratio=-0.1), r"crop_overlap_ratio a finite number in \[0, 1\)"),
        (dict(crop_overlap_ratio=math.nan), r"crop_overlap_ratio .*got nan"),
        (dict(pred_iou_thresh=math.nan), r"pred_iou_thresh a finite number in \[0, 1\].*got nan"),
        (dict(pred_iou_thresh=1.5), r"pred_iou_thresh a finite number in \[0, 1\]"),
        (dict(pred_iou_thresh=-0.2), r"pred_iou_thresh a finite number in \[0, 1\]"),
        (dict(pred_iou_thresh="0.9"), r"pred_iou_thresh a finite number"),
        (dict(stability_score_thresh=math.inf), r"stability_score_thresh a finite number in \[0, 1\]"),
        (dict(stability_score_thresh=1.01), r"stability_score_thresh"),
        (dict(box_nms_thresh=-1), r"box_nms_thresh a finite number in \[0, 1\]"),
        (dict(box_nms_thresh=2.0), r"box_nms_thresh"),
        (dict(crop_nms_thresh=math.nan), r"crop_nms_thresh a finite number in \[0, 1\]"),
        (dict(stability_score_offset=math.inf), r"stability_score_offset a finite number >= 0"),
        (dict(stability_score_offset=math.nan), r"stability_score_offset"),
        (dict(stability_score_offset=-1.0), r"stability_score_offset a finite number >= 0"),
        (dict(min_mask_region_area=-5), r"min_mask_region_area a finite number >= 0"),
        (dict(min_mask_region_area=math.inf), r"min_mask_region_area"),
        (dict(points_per_side=0), r"points_per_side an integer >= 1, got 0"),
        (dict(points_per_side=8.0), r"points_per_side an integer >= 1, got 8.0"),
        (dict(points_per_side=None), r"exactly one of points_per_side or point_grids"),
        (dict(point_grids=[np.full((4, 2), 0.5)]), r"exactly one of points_per_side or point_grids"),
        (dict(points_per_side=None, point_grids=[np.full((4, 2), 1.5)]), r"1 point grids of shape \(N, 2\), N >= 1, in \[0, 1\]"),
        (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), r"1 point grids .*got \[\(0, 2\)\]"),
        (dict(points_per_side=None, point_grids=[[["a", "b"]]]), r"point_grids a list of \(N, 2\) arrays"),
        (dict(points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2), r"at least 1 point per side"),
        (dict(points_per_batch=0), r"points_per_batch an integer >= 1, got 0"),
        (dict(points_per_batch=2.5), r"points_per_batch an integer >= 1"),
        (dict(crop_n_points_downscale_factor=0), r"crop_n_points_downscale_factor an integer >= 1"),
        (dict(output_mode="png"), r"output_mode in"),
        (dict(decode_chunk=0), r"decode_chunk None or an integer >= 1"),
        (dict(upsample_budget=0), r"upsample_budget an integer >= 1"),
    ],
)
def test_invalid_parameters_are_refused_up_front(oracle, kwargs, match):
    calls = oracle.encode_calls
    with pytest.raises(ValueError, match="expected " + match):
        SamAutomaticMaskGenerator(oracle, **kwargs)
    assert oracle.encode_calls == calls  # refused before any work


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0, crop_nms_thresh=1.0),
        dict(pred_iou_thresh=1, stability_score_thresh=1, box_nms_thresh=0, crop_nms_thresh=0),
        dict(crop_n_layers=MAX_CROP_LAYERS, crop_overlap_ratio=0.0, points_per_side=16, crop_n_points_downscale_factor=2),
        dict(stability_score_offset=0.0, min_mask_region_area=0),
        dict(pred_iou_thresh=np.float32(0.5), points_per_side=np.int64(8), points_per_batch=np.int32(16),
             crop_n_layers=np.int8(1), min_mask_region_area=np.float64(20.0)),
        dict(points_per_side=None, point_grids=[np.array([[0.0, 0.0], [1.0, 1.0]]), [[0.5, 0.5]]], crop_n_layers=1),
    ],
)
def test_valid_edge_parameters_are_accepted(oracle, kwargs):
    SamAutomaticMaskGenerator(oracle, **kwargs)


def test_fractional_min_area_keeps_its_meaning(oracle):
    """Regions smaller than 10.5 pixels are those smaller than 11."""
    assert SamAutomaticMaskGenerator(oracle, min_mask_region_area=10.5).min_mask_region_area == 11


def small_scene(shape):
    image = np.zeros(shape, np.uint8)
    h, w = shape
    image[h // 4 : max(h // 4 + 1, 3 * h // 4), w // 4 : max(w // 4 + 1, 3 * w // 4)] = 200
    return image


@pytest.mark.parametrize(
    "shape, layers",
    [((8, 8), 1), ((8, 8), 3), ((3, 3), 2), ((1, 1), 1), ((2, 50), 2), ((5, 40), 3)],
)
def test_small_images_with_crop_layers_work(oracle, shape, layers):
    """Small images leave some crops of deep layers empty (x1 <= x0) and used to fail late
    with "non-empty image, got shape (0, 1, 3)": those crops are skipped."""
    image = small_scene(shape)
    boxes, _ = generate_crop_boxes(shape, layers, 512 / 1500)
    gen = SamAutomaticMaskGenerator(FastOracle(image_size=64), points_per_side=2, crop_n_layers=layers,
                                    pred_iou_thresh=0, stability_score_thresh=0)
    steps = []
    masks = run_to_end(gen.run(image), steps.append)
    assert steps[-1].done == steps[-1].total  # the progress total counts only the used crops
    assert len(masks) >= 1
    for x0, y0, x1, y1 in masks.crop_boxes.tolist():
        assert x1 > x0 and y1 > y0 and [x0, y0, x1, y1] in boxes
    records = masks.to_records("binary_mask")
    assert all(r["segmentation"].shape == shape for r in records)


def test_crop_boxes_of_usual_images_are_the_references(oracle):
    """Nothing is skipped where the reference works: the crops are generate_crop_boxes'."""
    gen = SamAutomaticMaskGenerator(oracle, points_per_side=4, crop_n_layers=3)
    for shape in [(180, 300), (1024, 768), (50, 51), (8, 8), (40, 45)]:
        assert gen._crop_boxes(shape) == generate_crop_boxes(shape, 3, 512 / 1500)


def test_too_thin_image_is_refused_with_a_clear_message():
    gen = SamAutomaticMaskGenerator(OracleSam(image_size=1024), points_per_side=4, crop_n_layers=1)
    with pytest.raises(ValueError, match=r"got shape \(1, 3000\): it is too thin"):
        gen.generate(np.zeros((1, 3000), np.uint8))
