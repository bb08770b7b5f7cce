"""Propagating an object through a stack, interpolating between slices, with the oracle."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from oracle import OracleSam

from napari_sam.engine import SamPredictor
from napari_sam.engine.stack import VolumeEmbeddings
from napari_sam.engine.store import EmbeddingStore
from napari_sam.engine.volume import (STRATEGIES, PromptStrategy, PropagationResult,
                                      box_prompt, interior_points, interpolate, iou,
                                      mask_to_logits, propagate, run_generator,
                                      shape_interpolate)

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
def test_every_strategy_runs(scene, strategy):
    vol, truth, model, emb = scene
    result = run_generator(propagate(model, emb, 8, truth[8], strategy=strategy))
    assert result.first <= 8 <= result.last
    if strategy in ("box", "points", "box+points"):
        assert iou(result.to_volume(N), truth) >= 0.9


@pytest.mark.parametrize("strategy", ["box", "box+points"])
def test_stops_where_the_object_vanishes(strategy):
    z, y, x = np.mgrid[:12, :64, :64]
    truth = ((y - 30) ** 2 + (x - 34) ** 2 <= 15**2) & (z <= 8)  # a column ending at 8
    vol = (truth * 200).astype(np.uint8)
    model = OracleSam(256)
    emb = VolumeEmbeddings(vol, model, cache_size=12)
    result = run_generator(propagate(model, emb, 4, truth[4], strategy=strategy))
    up = next(s for s in result.stops if s.direction == 1)
    assert up.index == 9 and result.last == 8 and iou(result.to_volume(12), truth) > 0.9
    # a box finds nothing; points land on the background, which is no continuation either
    assert up.reason == ("vanished" if strategy == "box" else "low_iou")


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
    model = OracleSam(256)
    predictor = SamPredictor(model)
    predictor.set_image(np.zeros((60, 90), np.uint8))
    blob = np.zeros((60, 90), bool)
    blob[10:40, 20:70] = True
    logits = mask_to_logits(blob, predictor)
    assert logits.shape == (1, 64, 64)
    import torch

    up = model.postprocess_masks(torch.from_numpy(logits)[None], predictor.input_size, (60, 90))
    assert iou(up[0, 0].numpy() > 0, blob) > 0.95


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
