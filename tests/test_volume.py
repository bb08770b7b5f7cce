"""Propagating an object through a stack, interpolating between slices, with the oracle."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from oracle import OracleSam

from napari_sam.engine import SamPredictor, mask_to_logits, volume
from napari_sam.engine.stack import VolumeEmbeddings
from napari_sam.engine.store import EmbeddingStore
from napari_sam.engine.volume import (STRATEGIES, PromptStrategy, PropagationResult,
                                      box_prompt, interior_points, interpolate, iou,
                                      propagate, run_generator, shape_interpolate)

N, H, W = 17, 72, 88


def ellipsoid_scene():
    """uint8 (N, H, W): ellipsoid (200) plus a disc column (90) and a ball (140)."""
    z, y, x = np.mgrid[:N, :H, :W]
    truth = ((z - 8) / 7.5) ** 2 + ((y - 36) / 24) ** 2 + ((x - 36) / 18) ** 2 <= 1
    vol = np.zeros((N, H, W), np.uint8)
    vol[(y - 12) ** 2 + (x - 76) ** 2 <= 64] = 90
    vol[((z - 3) ** 2 + (y - 60) ** 2 + (x - 72) ** 2) <= 49] = 140
    vol[truth] = 200
    return vol, truth


@pytest.fixture(scope="module")
def scene():
    vol, truth = ellipsoid_scene()
    model = OracleSam(256)
    return vol, truth, model, VolumeEmbeddings(vol, model, cache_size=N)


def click_mask(model, image, x, y):
    """What the user gets from one click (the interactive preview)."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    masks, scores, low = predictor.predict(np.array([[x, y]]), np.array([1]))
    best = int(np.argmax(scores))
    return masks[best], low[best : best + 1]


def test_prompt_on_the_middle_slice_segments_the_ellipsoid(scene, tmp_path):
    vol, truth, model, _ = scene
    store = EmbeddingStore.open(tmp_path / "s.zarr", vol, model)
    mask, logits = click_mask(model, vol[8], x=36, y=36)
    assert iou(mask, truth[8]) > 0.9
    gen = propagate(model, store, 8, mask, start_logits=logits)
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert isinstance(result, PropagationResult) and result.masks.dtype == bool
    assert result.masks.shape == (result.last - result.first + 1, H, W)
    assert iou(result.to_volume(N), truth) >= 0.9
    assert len(progress) == len(result.stats) - 1
    assert [s.index for s in result.stats] == list(range(result.first, result.last + 1))
    assert {s.direction for s in result.stops} == {1, -1}
    assert all(s.reason in ("vanished", "low_iou", "end") for s in result.stops)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_follows_the_ellipsoid(scene, strategy):
    vol, truth, model, emb = scene
    result = run_generator(propagate(model, emb, 8, truth[8], strategy=strategy))
    assert iou(result.to_volume(N), truth) >= 0.9
    # the tips (slices 1 and 15, a few pixels) overlap their neighbours too little
    assert (result.first, result.last) == (2, 14)
    assert {(s.direction, s.reason, s.index) for s in result.stops} == {(1, "low_iou", 15),
                                                                         (-1, "low_iou", 1)}


def ball_in_a_ring(taper: float = 1.0):
    """(9, 96, 256): a ball (200, the object; a column for ``taper=0``) inside a
    ring-shaped tube (120) that comes closer than the box margin: a box around the ball's
    widest slices holds more ring than ball, so the oracle's box alone takes the ring
    there; only the mask prompt can say which is meant. Longest side 256 = the oracle's
    input: no resampling blur, padding below."""
    z, y, x = np.mgrid[:9, :96, :256]
    r = np.hypot(y - 40, x - 60)
    truth = r <= 16 - taper * np.abs(z - 4)
    vol = np.zeros(truth.shape, np.uint8)
    vol[(r >= 20) & (r <= 38)] = 120
    vol[truth] = 200
    return vol, truth


def cell_with_nucleus():
    """(9, 96, 256): a cell (120) whose nucleus (200) holds all the cell's deep interior:
    the propagation's interior points all land on the nucleus. The object is the cell."""
    z, y, x = np.mgrid[:9, :96, :256]
    r = np.hypot(y - 48, x - 150)
    truth = r <= 30 - 1.5 * np.abs(z - 4)
    vol = (truth * 120).astype(np.uint8)
    nucleus = r <= 18 - np.abs(z - 4)
    vol[nucleus] = 200
    return vol, truth, nucleus


def run(vol, truth, start, strategy, **kwargs):
    model = OracleSam(256)
    emb = VolumeEmbeddings(vol, model, cache_size=len(vol))
    return run_generator(propagate(model, emb, start, truth[start], strategy=strategy, **kwargs))


def assert_whole_stack(result, truth, min_iou=0.95):
    """Every slice kept, each close to the truth, both directions ran to the end."""
    n = len(truth)
    assert (result.first, result.last) == (0, n - 1)
    assert {(s.reason, s.index) for s in result.stops} == {("end", None)}
    assert min(iou(m, t) for m, t in zip(result.masks, truth)) >= min_iou


def assert_stopped_at_once(result, start):
    """The first step each way took another object: nothing beyond the start slice."""
    assert (result.first, result.last) == (start, start)
    assert {(s.reason, s.index) for s in result.stops} == {("low_iou", start + 1),
                                                           ("low_iou", start - 1)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_mask_prompt_chooses_between_objects_in_the_box(strategy):
    vol, truth = ball_in_a_ring()
    result = run(vol, truth, 4, strategy)
    if strategy in ("box", "box+points"):  # a box alone (or + points, a union) takes the ring
        assert_stopped_at_once(result, 4)
    else:  # with a mask (start: mask_to_logits of the start mask), the ball
        assert_whole_stack(result, truth)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_mask_prompt_keeps_what_the_points_miss(strategy):
    vol, truth, nucleus = cell_with_nucleus()
    result = run(vol, truth, 4, strategy)
    if strategy == "points":  # all points on the nucleus: the nucleus only
        assert_stopped_at_once(result, 4)
    elif strategy == "mask":  # a mask alone gives the region it overlaps most: the cytoplasm
        assert (result.first, result.last) == (0, 8)
        assert iou(result.masks[5:], (truth & ~nucleus)[5:]) >= 0.95
    else:  # the box or the mask brings the cytoplasm, the points the nucleus
        assert_whole_stack(result, truth)


def upper_and_lower():
    """(7, 40, 120): the object (200) in the upper part of a wide image, another (120)
    below it. The model input (S = 256) holds the image in its top 85 rows, the rest is
    padding: a start mask mapped without that padding lands on the lower object."""
    z, y, x = np.mgrid[:7, :40, :120]
    truth = np.hypot((y - 9) / 6, (x - 30) / 14) <= 1
    vol = np.zeros(truth.shape, np.uint8)
    vol[np.hypot((y - 29) / 8, (x - 30) / 20) <= 1] = 120
    vol[truth] = 200
    return vol, truth


def clicked(vol, xy):
    """What the oracle returns for a click at ``xy`` on each slice: (N, H, W) bool (its
    resampling blurs a 40 x 120 image, so this, not the drawn truth, is the exact answer)."""
    predictor = SamPredictor(OracleSam(256))
    out = []
    for image in vol:
        predictor.set_image(image)
        masks, _, _ = predictor.predict(np.array([xy]), np.array([1]), multimask_output=False)
        out.append(masks[0])
    return np.stack(out)


@pytest.mark.parametrize("strategy", ["mask", "points+mask", "box+mask", "box+points+mask"])
def test_a_start_mask_on_a_padded_non_square_image(strategy):
    vol, truth = upper_and_lower()
    result = run(vol, truth, 3, strategy)
    assert (result.first, result.last) == (0, 6)
    assert {s.reason for s in result.stops} == {"end"} and (result.masks[3] == truth[3]).all()
    expected = clicked(vol, (30, 9))
    if "box" in strategy:  # the oracle's box keeps the blurred border pixels a click drops
        expected = truth
    others = [j for j in range(7) if j != 3]
    assert iou(result.masks[others], expected[others]) >= (0.85 if "box" in strategy else 0.999)


def stretched_to_the_frame(mask, predictor):
    """Broken on purpose: the mask fills the whole low-res grid (no padding)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, predictor.low_res_size, mode="bilinear", antialias=True)
    return (8 * (2 * t[0] - 1)).numpy()


def transposed(mask, predictor):
    """Broken on purpose: rows and columns swapped (padding on the right)."""
    return mask_to_logits(mask, predictor).transpose(0, 2, 1).copy()


def dropped(mask, predictor):
    """Broken on purpose: an empty prompt, as if the mask were ignored."""
    return np.full((1, *predictor.low_res_size), -8.0, np.float32)


@pytest.mark.parametrize("broken", [stretched_to_the_frame, transposed, dropped])
@pytest.mark.parametrize("strategy", ["mask", "points+mask"])
def test_a_mis_mapped_start_mask_is_caught(monkeypatch, broken, strategy):
    """The scene above is sharp enough: with a wrongly mapped start mask, a mask prompt
    finds the lower object or nothing (points+mask: dropping the mask goes unnoticed
    there, the points carry the object)."""
    monkeypatch.setattr(volume, "mask_to_logits", broken)
    vol, truth = upper_and_lower()
    result = run(vol, truth, 3, strategy)
    if strategy == "points+mask" and broken is dropped:
        assert (result.first, result.last) == (0, 6)
    else:
        assert (result.first, result.last) == (3, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stops_where_the_object_vanishes(strategy):
    z, y, x = np.mgrid[:12, :64, :64]
    truth = ((y - 30) ** 2 + (x - 34) ** 2 <= 15**2) & (z <= 8)  # a column ending at 8
    vol = (truth * 200).astype(np.uint8)
    result = run(vol, truth, 4, strategy)
    up = next(s for s in result.stops if s.direction == 1)
    # (0.85: the oracle's x4 resampling blurs the border a region's intensity test drops)
    assert up.index == 9 and result.last == 8 and iou(result.to_volume(12), truth) > 0.85
    # a box or a mask finds nothing; points land on the background, which is no
    # continuation either
    assert up.reason == ("low_iou" if "points" in strategy else "vanished")


def test_stops_when_iou_with_the_previous_slice_drops():
    z, y, x = np.mgrid[:12, :64, :64]
    radius = np.where(z < 7, 20, 7)  # the object narrows abruptly at slice 7
    truth = (y - 32) ** 2 + (x - 32) ** 2 <= radius**2
    vol = (truth * 200).astype(np.uint8)
    model = OracleSam(256)
    emb = VolumeEmbeddings(vol, model, cache_size=12)
    result = run_generator(propagate(model, emb, 3, truth[3], iou_threshold=0.5))
    up = next(s for s in result.stops if s.direction == 1)
    assert (up.reason, up.index, result.last) == ("low_iou", 7, 6) and up.iou_prev < 0.5
    down = next(s for s in result.stops if s.direction == -1)
    assert (down.reason, result.first) == ("end", 0)
    lenient = run_generator(propagate(model, emb, 3, truth[3], strategy="box", iou_threshold=0.1))
    assert lenient.last == 11 and iou(lenient.to_volume(12), truth) > 0.9


def test_user_range_and_single_direction(scene):
    vol, truth, model, emb = scene
    result = run_generator(propagate(model, emb, 8, truth[8], stop_range=(6, 10)))
    assert (result.first, result.last) == (6, 10)
    assert {s.reason for s in result.stops} == {"range"}
    up = run_generator(propagate(model, emb, 8, truth[8], directions=(1,)))
    assert up.first == 8 and up.last > 8 and len(up.stops) == 1


def test_time_series_drift_along_another_axis():
    t, y, x = np.mgrid[:10, :64, :80]
    truth = (y - 32) ** 2 + (x - 16 - 5 * t) ** 2 <= 12**2  # moves 5 px per frame
    vol = np.moveaxis((truth * 180).astype(np.uint8), 0, 1)  # (Y, T, X): t is axis 1
    model = OracleSam(256)
    emb = VolumeEmbeddings(vol, model, axis=1, cache_size=10)
    result = run_generator(propagate(model, emb, 0, truth[0]))
    assert (result.first, result.last) == (0, 9)
    assert iou(result.to_volume(10), truth) >= 0.9


def test_cancelling_changes_nothing(scene):
    vol, truth, model, emb = scene
    start = truth[8].copy()
    mine = SamPredictor(model)
    mine.set_image(vol[2])
    before = mine.get_embedding()
    gen = propagate(model, emb, 8, start)
    next(gen), next(gen)
    gen.close()
    cancel = threading.Event()
    gen = propagate(mine, emb, 8, start, cancel=cancel)
    next(gen)
    cancel.set()
    assert run_generator(gen) is None
    assert (start == truth[8]).all() and mine.get_embedding() is before


def test_interpolate_between_two_annotated_slices(scene):
    vol, truth, model, emb = scene
    result = run_generator(interpolate(model, emb, 13, truth[13], 3, truth[3]))
    assert (result.first, result.last) == (3, 13)
    assert (result.masks[0] == truth[3]).all() and (result.masks[-1] == truth[13]).all()
    assert iou(result.masks, truth[3:14]) >= 0.9
    sources = [s.source for s in result.stats]
    assert sources[0] == sources[-1] == "annotated" and set(sources[1:-1]) == {"propagated"}


@pytest.mark.parametrize("hidden", [4, 6])  # at the midpoint / where one side must go on
def test_interpolate_fills_what_sam_cannot_reach_by_shape(hidden):
    z, y, x = np.mgrid[:9, :64, :64]
    truth = (y - 32) ** 2 + (x - 32) ** 2 <= (10 + z) ** 2
    vol = (truth * 200).astype(np.uint8)
    vol[hidden] = 0  # the object is invisible there: SAM stops on both sides
    model = OracleSam(256)
    emb = VolumeEmbeddings(vol, model, cache_size=9)
    result = run_generator(interpolate(model, emb, 0, truth[0], 8, truth[8]))
    sources = {s.index: s.source for s in result.stats}
    assert sources == {0: "annotated", 8: "annotated", hidden: "interpolated",
                       **{j: "propagated" for j in range(1, 8) if j != hidden}}
    assert iou(result.masks[hidden], truth[hidden]) > 0.85
    assert iou(result.masks, truth) > 0.9


@pytest.mark.parametrize("strategy", ["box", "mask", "box+mask"])
def test_interpolate_with_mask_prompts(strategy):
    """Both annotated ends become mask prompts through mask_to_logits."""
    vol, truth = ball_in_a_ring(taper=0)
    model = OracleSam(256)
    emb = VolumeEmbeddings(vol, model, cache_size=9)
    result = run_generator(interpolate(model, emb, 0, truth[0], 8, truth[8], strategy=strategy))
    sources = [s.source for s in result.stats]
    if strategy == "box":  # takes the ring at once from both ends: shapes are interpolated
        assert set(sources[1:-1]) == {"interpolated"}
        assert {s.reason for s in result.stops} == {"low_iou"}
    else:
        assert set(sources[1:-1]) == {"propagated"}
        assert min(iou(m, t) for m, t in zip(result.masks, truth)) >= 0.95


def test_geometry_helpers():
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    small, large = r <= 10, r <= 20
    mid = shape_interpolate(small, large, 0.5)
    assert abs(mid.sum() / (np.pi * 15**2) - 1) < 0.1
    ring = (r <= 20) & (r >= 12)
    pts = interior_points(ring, 3)
    assert pts.shape == (3, 2) and all(ring[int(round(py)), int(round(px))] for px, py in pts)
    box = box_prompt(small, 0.25)
    assert np.allclose(box, [30 - 5.25, 30 - 5.25, 50 + 5.25, 50 + 5.25])


def test_bad_input_is_a_clear_error(scene):
    vol, truth, model, emb = scene
    for args, match in [((8, np.zeros((H, W), bool)), "non-empty start mask"),
                        ((8, truth[8][:10]), "shape"), ((N, truth[8]), "start index")]:
        with pytest.raises(ValueError, match=match):
            run_generator(propagate(model, emb, *args))
    with pytest.raises(ValueError, match="strategy"):
        PromptStrategy.parse("box+lasso")
    with pytest.raises(ValueError, match="stop_range"):
        run_generator(propagate(model, emb, 8, truth[8], stop_range=(0, 5)))
    with pytest.raises(ValueError, match="2 apart"):
        run_generator(interpolate(model, emb, 4, truth[4], 5, truth[5]))


def test_tiny_sam_propagates_without_error(tiny_sam):
    vol, _ = ellipsoid_scene()
    emb = VolumeEmbeddings(vol[6:11], tiny_sam, cache_size=5)
    mask = np.zeros((H, W), bool)
    mask[20:50, 20:50] = True
    result = run_generator(propagate(tiny_sam, emb, 2, mask, strategy="box+points+mask",
                                     iou_threshold=0.0, min_area=0))
    assert result.first <= 2 <= result.last and result.masks.shape[1:] == (H, W)
