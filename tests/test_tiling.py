"""Tiled embeddings: the grid's geometry, and clicks/boxes on a 5000 x 3000 image decoded on
the right tile, checked with the oracle (which knows every object)."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import OracleSam

from napari_sam.engine.automatic import run_to_end
from napari_sam.engine.tiled_predictor import TiledPredictor, encode_tiles_job
from napari_sam.engine.tiling import TileGrid, tile_grid, tiled_contrast_limits

IMAGE_HW = (5000, 3000)


@pytest.mark.parametrize("hw,tile,halo", [((5000, 3000), 1024, 128), ((1025, 700), 512, 64),
                                          ((3001, 2999), (600, 400), (50, 30)), ((200, 90), 256, 32)])
def test_grid_interiors_partition_the_image_with_context(hw, tile, halo):
    grid = TileGrid(hw, tile, halo)
    owner = np.zeros(hw, int)
    for t in grid.tiles:
        r0, r1, c0, c1 = t.outer_rc
        assert t.shape_hw == grid.tile_hw == tuple(min(a, b) for a, b in zip(hw, grid.tile_shape))
        assert 0 <= r0 < r1 <= hw[0] and 0 <= c0 < c1 <= hw[1]
        i0, i1, j0, j1 = t.inner_rc
        owner[i0:i1, j0:j1] += 1
        # an interior pixel has >= halo pixels of context in its tile, except at image borders
        assert i0 == 0 or i0 - r0 >= grid.halo[0]
        assert i1 == hw[0] or r1 - i1 >= grid.halo[0]
        assert j0 == 0 or j0 - c0 >= grid.halo[1]
        assert j1 == hw[1] or c1 - j1 >= grid.halo[1]
    assert (owner == 1).all()
    rng = np.random.default_rng(0)
    for r, c in zip(rng.integers(0, hw[0], 50), rng.integers(0, hw[1], 50)):
        i0, i1, j0, j1 = grid.tile_at(r, c).inner_rc
        assert i0 <= r < i1 and j0 <= c < j1


def test_grid_refuses_a_halo_that_leaves_no_interior():
    with pytest.raises(ValueError, match="halo smaller than half the tile"):
        TileGrid((5000, 5000), 256, 128)


def test_auto_tiling_threshold():
    assert tile_grid((1500, 1500), 1024) is None  # squeezed at most 1.5x: one encode
    assert tile_grid((1600, 1500), 1024).grid_shape == (2, 2)
    assert tile_grid((1500, 1500), 1024, "on").grid_shape == (2, 2)
    assert tile_grid((5000, 3000), 1024, "off") is None
    assert tile_grid((900, 900), 1024, "on") is None  # fits one tile


def _disk_image(hw, grid, rng, n_random=120, radius=(10, 22)):
    """(H, W) uint8 image of separated disks (radius >= 10: SAM's 4x low-res masks blur
    smaller ones below IoU 0.9 at any tiling), their (H, W) int labels, and their centres;
    ~ a third of the disks are centred on interior borders or on tile edges."""
    image = np.zeros(hw, np.uint8)
    labels = np.zeros(hw, np.int32)
    centres = []
    borders_r = sorted({t.inner_rc[1] for t in grid.tiles if t.inner_rc[1] < hw[0]} |
                       {t.outer_rc[1] for t in grid.tiles if t.outer_rc[1] < hw[0]})
    borders_c = sorted({t.inner_rc[3] for t in grid.tiles if t.inner_rc[3] < hw[1]} |
                       {t.outer_rc[3] for t in grid.tiles if t.outer_rc[3] < hw[1]})
    candidates = [(rng.integers(40, hw[0] - 40), rng.integers(40, hw[1] - 40)) for _ in range(n_random)]
    candidates += [(b, rng.integers(40, hw[1] - 40)) for b in borders_r for _ in range(4)]
    candidates += [(rng.integers(40, hw[0] - 40), b) for b in borders_c for _ in range(4)]
    yy, xx = np.mgrid[-30:31, -30:31]
    for r, c in candidates:
        rad = int(rng.integers(*radius))
        disk = yy**2 + xx**2 <= rad**2
        window = (slice(r - 30, r + 31), slice(c - 30, c + 31))
        if labels[r - 33:r + 34, c - 33:c + 34].any():  # keep objects apart
            continue
        k = len(centres) + 1
        labels[window][disk] = k
        image[window][disk] = 60 + (k * 37) % 190
        centres.append((r, c))
    return image, labels, centres


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def tiled_disks():
    grid = TileGrid(IMAGE_HW, 1024, 128)
    image, labels, centres = _disk_image(IMAGE_HW, grid, np.random.default_rng(1))
    predictor = TiledPredictor(OracleSam(1024))
    predictor.set_image(image, tiling="on")
    return predictor, image, labels, centres


def test_every_object_is_recovered_by_a_click_including_tile_borders(tiled_disks):
    predictor, _image, labels, centres = tiled_disks
    assert predictor.grid.grid_shape == (7, 4)
    assert predictor.model.encode_calls == 28
    on_border = 0
    for k, (r, c) in enumerate(centres, start=1):
        result = predictor.predict_tile(np.array([[c + 0.5, r + 0.5]]), np.array([1]), multimask_output=False)
        r0, r1, c0, c1 = result.tile.outer_rc
        truth = labels[r0:r1, c0:c1] == k
        assert truth.sum() == (labels == k).sum()  # the whole object is in the chosen tile
        assert _iou(result.masks[0], truth) >= 0.9, (k, r, c)
        i0, i1, j0, j1 = result.tile.inner_rc
        on_border += min(abs(r - i0), abs(r - i1), abs(c - j0), abs(c - j1)) < 25
    assert len(centres) >= 100 and on_border >= 30


def test_predict_returns_masks_in_image_coordinates(tiled_disks):
    predictor, _image, labels, centres = tiled_disks
    r, c = centres[len(centres) // 2]
    masks, iou, low_res = predictor.predict(np.array([[c, r]]), np.array([1]), multimask_output=True)
    assert masks.shape == (3, *IMAGE_HW) and iou.shape == (3,) and low_res.shape == (3, 256, 256)
    assert _iou(masks[int(np.argmax(iou))], labels == labels[r, c]) >= 0.9


def test_boxes_spanning_an_interior_border_use_the_tile_holding_most_of_them(tiled_disks):
    predictor, _image, labels, centres = tiled_disks
    grid = predictor.grid
    checked = 0
    for k, (r, c) in enumerate(centres, start=1):
        rows, cols = np.nonzero(labels[r - 30:r + 31, c - 30:c + 31] == k)
        box = np.array([cols.min() + c - 30, rows.min() + r - 30, cols.max() + c - 30, rows.max() + r - 30])
        owners = {grid.tile_at(y, x).index for x in box[[0, 2]] for y in box[[1, 3]]}
        if len(owners) < 2:
            continue
        checked += 1
        result = predictor.predict_tile(box=box, multimask_output=False)
        full = result.full(IMAGE_HW)[0]
        assert _iou(full, labels == k) >= 0.9, (k, box)
    assert checked >= 20


def test_a_box_larger_than_a_tile_is_decoded_on_the_tile_holding_most_of_it():
    grid = TileGrid(IMAGE_HW, 1024, 128)
    tile = grid.tile_for_box([100, 100, 1500, 900])
    assert tile.index == 0  # its interior (843 x 841) holds most of the box


class CountingArray:
    """An (H, W) array-like recording every region read (a stand-in for zarr/dask)."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_tiles_are_read_one_at_a_time_from_a_lazy_image():
    rng = np.random.default_rng(3)
    data = CountingArray(rng.integers(0, 4000, (2500, 1300), dtype=np.uint16))
    grid = TileGrid(data.shape, 512, 64)
    limits = tiled_contrast_limits(data, grid)
    assert len(data.reads) <= 16 and limits[0] < limits[1]
    data.reads.clear()
    oracle = OracleSam(1024)  # 512-pixel tiles are resized 2x
    embedding = run_to_end(encode_tiles_job(TiledPredictor(oracle).predictor, data, grid, limits))
    assert len(embedding.tiles) == len(grid) == len(data.reads)
    for key, tile in zip(data.reads, grid.tiles):
        assert key == tile.outer_slices  # exactly one tile's region, never the whole image
