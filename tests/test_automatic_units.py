"""Building blocks of segment everything against the reference's helpers and explicit cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference_shim import _greedy_nms, import_segment_anything

from napari_sam.engine import amg_utils as ours
from napari_sam.engine.label_image import link_slices, masks_to_label_image
from napari_sam.engine.mask_set import (
    CompactMask,
    MaskSet,
    _clean_mask,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
)


@pytest.fixture(scope="module")
def ref_amg():
    import_segment_anything()
    from segment_anything.utils import amg

    return amg


def test_grids_and_crops_match_reference(ref_amg):
    for n, layers, scale in [(32, 0, 1), (16, 2, 2), (7, 1, 1)]:
        for a, b in zip(ours.build_all_layer_point_grids(n, layers, scale), ref_amg.build_all_layer_point_grids(n, layers, scale)):
            np.testing.assert_array_equal(a, b)
    for size, layers in [((180, 300), 2), ((1024, 768), 1), ((50, 51), 3)]:
        assert ours.generate_crop_boxes(size, layers, 512 / 1500) == ref_amg.generate_crop_boxes(size, layers, 512 / 1500)


def test_nms_matches_greedy_reference_with_ties_and_empty_boxes():
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 300, 1200):
        xy = torch.randint(0, 60, (n, 2), generator=gen).float()
        wh = torch.randint(0, 25, (n, 2), generator=gen).float()  # some zero-area boxes
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.randint(0, 5, (n,), generator=gen).float()  # many ties
        for thresh in (0.0, 0.5, 0.7, 1.0):
            expected = _greedy_nms(boxes, scores, thresh)
            got = ours.nms(boxes, scores, thresh, block=64)
            assert got.tolist() == expected.tolist()


def test_boxes_edges_and_stability_match_reference(ref_amg):
    gen = torch.Generator().manual_seed(1)
    logits = F.interpolate(torch.randn(12, 1, 6, 9, generator=gen) * 4, (40, 70), mode="bilinear")[:, 0]
    logits[3] = -1  # empty mask
    masks = logits > 0
    assert torch.equal(ours.batched_mask_to_box(masks), ref_amg.batched_mask_to_box(masks))
    torch.testing.assert_close(ours.stability_score(logits, 0.0, 1.0), ref_amg.calculate_stability_score(logits, 0.0, 1.0), equal_nan=True)
    boxes = ours.batched_mask_to_box(masks)
    for crop in ([0, 0, 70, 40], [30, 10, 100, 50]):
        assert torch.equal(
            ours.is_box_near_crop_edge(boxes, crop, [0, 0, 100, 50]),
            ref_amg.is_box_near_crop_edge(boxes, crop, [0, 0, 100, 50]),
        )


@pytest.mark.parametrize(
    "low_res, size, input_size, original",
    [
        ((64, 64), 256, (256, 256), (256, 256)),  # identity second step
        ((64, 64), 256, (154, 256), (180, 300)),  # upsampled, non-square
        ((64, 64), 256, (256, 171), (600, 400)),
        ((64, 64), 256, (205, 256), (40, 50)),  # downsampled
    ],
)
def test_stability_bound_is_an_upper_bound(low_res, size, input_size, original):
    gen = torch.Generator().manual_seed(2)
    smooth = F.interpolate(torch.randn(40, 1, 8, 8, generator=gen) * 6, low_res, mode="bilinear")[:, 0]
    logits = smooth + 0.5 * torch.randn(40, *low_res, generator=gen)
    logits[0] = -5  # empty: union 0
    logits[1] = 5  # full: stability 1
    full = F.interpolate(logits[:, None], (size, size), mode="bilinear", align_corners=False)
    full = full[..., : input_size[0], : input_size[1]]
    full = F.interpolate(full, original, mode="bilinear", align_corners=False)[:, 0]
    exact = ours.stability_score(full, 0.0, 1.0).double()
    bound = ours.StabilityBound(low_res, size, input_size, original).upper(logits, 0.0, 1.0)
    assert bound[0] == 0.0 and bound[1] == 1.0  # empty (score NaN) and full masks
    valid = ~torch.isnan(exact)
    assert (bound[valid] >= exact[valid] - 1e-6).all()
    assert (bound[valid] - exact[valid]).median() < 0.3  # and useful: it rejects masks


def test_rle_round_trip_matches_reference(ref_amg):
    rng = np.random.default_rng(0)
    masks = rng.random((5, 13, 17)) > 0.6
    masks[0] = True
    masks[1] = False
    for m in masks:
        rle = mask_to_rle(m)
        assert rle == ref_amg.mask_to_rle_pytorch(torch.from_numpy(m)[None])[0]
        np.testing.assert_array_equal(rle_to_mask(rle), m)
        compact = CompactMask.from_array(m)
        np.testing.assert_array_equal(compact.full(m.shape), m)
        assert compact.area == m.sum()


def test_remove_small_regions_explicit():
    mask = np.zeros((12, 12), bool)
    mask[1:8, 1:8] = True
    mask[4, 4] = False  # 1-pixel hole
    mask[10, 10] = True  # 1-pixel island
    filled, changed = remove_small_regions(mask, 3, "holes")
    assert changed and filled[4, 4] and filled[10, 10]
    cleaned, changed = remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[10, 10] and cleaned[1:8, 1:8].all()
    same, changed = remove_small_regions(cleaned, 3, "islands")
    assert not changed and (same == cleaned).all()
    # every island small: the largest one stays
    specks = np.zeros((8, 8), bool)
    specks[0, 0] = True
    specks[4:6, 4:6] = True
    kept, changed = remove_small_regions(specks, 10, "islands")
    assert changed and kept.sum() == 4 and kept[4:6, 4:6].all()
    with pytest.raises(ValueError, match="expected mode"):
        remove_small_regions(mask, 3, "dots")


def test_box_window_clean_up_equals_whole_image_clean_up():
    """The bounding-box shortcut gives what cleaning the whole image gives, also for masks
    touching image edges or spanning the image."""
    rng = np.random.default_rng(3)
    shape = (30, 40)
    for k in range(60):
        noise = F.interpolate(torch.from_numpy(rng.normal(size=(1, 1, 6, 8))), shape, mode="bilinear")[0, 0].numpy()
        mask = noise > rng.uniform(-0.5, 0.8)
        mask &= rng.random(shape) > 0.03  # pinholes
        if k % 3 == 0:
            mask[:, :2] = False
        for min_area in (2, 8, 40):
            expected, _ = remove_small_regions(mask, min_area, "holes")
            expected, _ = remove_small_regions(expected, min_area, "islands")
            content, (oy, ox), _ = _clean_mask(CompactMask.from_array(mask), shape, min_area)
            got = np.zeros(shape, bool)
            got[oy : oy + content.shape[0], ox : ox + content.shape[1]] = content
            np.testing.assert_array_equal(got, expected)


def _mask_set(masks, ious, stabilities):
    return MaskSet(
        masks[0].shape,
        [CompactMask.from_array(m) for m in masks],
        boxes=np.zeros((len(masks), 4), np.int64),
        predicted_iou=np.array(ious, np.float32),
        stability_score=np.array(stabilities, np.float32),
        points=np.zeros((len(masks), 2)),
        crop_boxes=np.zeros((len(masks), 4), np.int64),
    )


def test_label_image_higher_quality_wins():
    big, small, other, tiny = (np.zeros((20, 20), bool) for _ in range(4))
    big[2:12, 2:12] = True
    small[8:14, 8:14] = True  # overlaps big
    other[15:19, 15:19] = True
    tiny[0, 19] = True
    masks = _mask_set([big, small, other, tiny], [0.90, 0.95, 0.90, 0.99], [0.97, 0.96, 0.99, 0.99])
    labels = masks_to_label_image(masks)
    # order: tiny (0.99), small (0.95), other (0.90, stabler), big
    assert labels[0, 19] == 1 and (labels[small] == 2).all() and (labels[other] == 3).all()
    assert (labels[big & ~small] == 4).all() and labels.max() == 4
    labels = masks_to_label_image(masks, min_size=5)
    assert labels[0, 19] == 0 and labels.max() == 3
    records = [{"segmentation": m, "predicted_iou": q, "stability_score": 0.9} for m, q in zip([big, small], [0.8, 0.9])]
    assert (masks_to_label_image(records)[small] == 1).all()


def test_link_slices_keeps_ids_through_z():
    a = np.zeros((4, 10, 10), np.int32)
    a[0, 1:4, 1:4] = 5  # object A, drifting right
    a[1, 1:4, 2:5] = 1
    a[2, 1:4, 3:6] = 7
    a[0, 6:9, 6:9] = 2  # object B, gone in slice 2, back in slice 3 (new id)
    a[1, 6:9, 6:9] = 3
    a[3, 6:9, 6:9] = 1
    a[2, 7:9, 0:2] = 9  # object C, appears
    out = link_slices(a, min_iou=0.3)
    assert len({out[z, 2, 3] for z in range(3)}) == 1  # A: one id
    assert out[0, 7, 7] == out[1, 7, 7] != out[3, 7, 7]
    assert out[2, 8, 0] not in {out[0, 2, 2], out[0, 7, 7], out[3, 7, 7]}
    assert sorted(np.unique(out)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"expected \(N, H, W\) labels"):
        link_slices(a[0])


def test_bad_parameters_are_rejected(tiny_sam):
    from napari_sam.engine.automatic import SamAutomaticMaskGenerator

    with pytest.raises(ValueError, match="expected exactly one of points_per_side or point_grids"):
        SamAutomaticMaskGenerator(tiny_sam, points_per_side=None)
    with pytest.raises(ValueError, match="expected 2 point grids"):
        SamAutomaticMaskGenerator(tiny_sam, points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1)
    with pytest.raises(ValueError, match="expected output_mode"):
        SamAutomaticMaskGenerator(tiny_sam, output_mode="png")
    with pytest.raises(ValueError, match="expected points_per_batch an integer >= 1"):
        SamAutomaticMaskGenerator(tiny_sam, points_per_batch=0)
    gen = SamAutomaticMaskGenerator(tiny_sam, points_per_side=2)
    with pytest.raises(ValueError, match="expected a 2D image"):
        gen.generate(np.zeros((2, 3, 4, 5)))
    assert gen.generate(np.zeros((40, 30), np.uint16)) == []  # flat image: no crash
