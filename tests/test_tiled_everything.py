"""Tiled segment-everything: AIS, AMG and APG tile by tile on a 5000 x 3000 image, stitched
across tile borders (every object once: no duplicates, no halves), with the oracle (which
knows every object); the stitcher on hand-made tiles; streaming stacks; cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr
from oracle import TOLERANCE, with_instance_decoder
from test_automatic_oracle import FastOracle, draw_objects

from napari_sam.engine.automatic import run_to_end
from napari_sam.engine.instances import SamInstanceSegmenter
from napari_sam.engine.label_image import link_slices
from napari_sam.engine.stitching import TileStitcher, stitch_tiles
from napari_sam.engine.tiled_predictor import TiledPredictor, encode_tiles_job
from napari_sam.engine.tiling import TileGrid

IMAGE_HW = (5000, 3000)
GRID = TileGrid(IMAGE_HW, 1024, 128)


# ---------------------------------------------------------------------------- scene
def _borders(grid: TileGrid, axis: int) -> list[int]:
    """Interior borders and tile edges (both sides) along ``axis`` (0 rows, 1 cols)."""
    n = grid.image_hw[axis]
    values = set()
    for t in grid.tiles:
        values |= {t.inner_rc[2 * axis + 1], t.outer_rc[2 * axis], t.outer_rc[2 * axis + 1]}
    return sorted(v for v in values if 0 < v < n)


def tiled_scene(grid: TileGrid, seed: int = 0, radius=(12, 22), n_random: int = 60, per_border: int = 3):
    """(H, W) uint8 image and (H, W) int32 truth labels of separated objects (>= 4 pixels
    apart, each of its own intensity within its neighbourhood): large objects crossing
    tile borders (a disk over an interior corner, spanning 4 tiles; bands longer than the
    halo crossing one or several borders), then small disks centred on interior borders
    and on tile edges (``per_border`` each), and ``n_random`` anywhere."""
    hw = grid.image_hw
    rng = np.random.default_rng(seed)
    truth = np.zeros(hw, np.int32)
    rows = sorted({t.inner_rc[1] for t in grid.tiles if t.inner_rc[1] < hw[0]})
    cols = sorted({t.inner_rc[3] for t in grid.tiles if t.inner_rc[3] < hw[1]})
    def put(rs: slice, cs: slice, mask=None) -> None:
        pad = (slice(max(rs.start - 4, 0), rs.stop + 4), slice(max(cs.start - 4, 0), cs.stop + 4))
        if not truth[pad].any():
            shape = (rs.stop - rs.start, cs.stop - cs.start)
            truth[rs, cs][np.ones(shape, bool) if mask is None else mask] = truth.max() + 1

    def disk(r: int, c: int, rad: int) -> None:
        if rad <= r < hw[0] - rad and rad <= c < hw[1] - rad:
            d = np.arange(-rad, rad + 1)
            put(slice(r - rad, r + rad + 1), slice(c - rad, c + rad + 1), d[:, None] ** 2 + d**2 <= rad**2)

    halo = grid.halo[0]
    half = max(halo // 4, 16)  # bands >= 32 pixels wide
    disk(rows[0], cols[0], int(1.6 * halo))  # over an interior corner: 4 tiles
    put(slice(rows[-1] - half, rows[-1] + half), slice(hw[1] // 10, hw[1] * 9 // 10))  # along a border, across all
    put(slice(rows[-1] - 5 * halo, rows[-1] - 2 * halo), slice(cols[0] - half, cols[0] + half))
    c_mid = (cols[0] + (cols[1] if len(cols) > 1 else hw[1])) // 2
    put(slice(rows[0] + 3 * halo, rows[0] + 9 * halo), slice(c_mid - half, c_mid + half))  # a row border
    centres = [(b, int(rng.integers(40, hw[1] - 40))) for b in _borders(grid, 0) for _ in range(per_border)]
    centres += [(int(rng.integers(40, hw[0] - 40)), b) for b in _borders(grid, 1) for _ in range(per_border)]
    centres += [(int(rng.integers(40, hw[0] - 40)), int(rng.integers(40, hw[1] - 40))) for _ in range(n_random)]
    for r, c in centres:
        disk(r, c, int(rng.integers(*radius)))
    n = int(truth.max())
    intensity = (60 + (np.arange(n + 1) * 37) % 190).astype(np.uint8)
    intensity[0] = 0
    return intensity[truth], truth


def one_to_one(labels: np.ndarray, truth: np.ndarray, min_iou: float = 0.9) -> dict:
    """Every true object is one label with IoU >= min_iou, every label one true object:
    no duplicates, no halves, no extra objects. Returns {true id: label}."""
    labels = np.asarray(labels).astype(np.int64)
    n_true, n_found = int(truth.max()), int(labels.max())
    stride = n_found + 1
    pairs, shared = np.unique(truth.astype(np.int64) * stride + labels, return_counts=True)
    t_ids, l_ids = pairs // stride, pairs % stride
    t_area = np.bincount(truth.ravel(), minlength=n_true + 1)
    l_area = np.bincount(labels.ravel(), minlength=n_found + 1)
    iou = shared / (t_area[t_ids] + l_area[l_ids] - shared)
    good = (t_ids > 0) & (l_ids > 0) & (iou >= min_iou)
    match = dict(zip(t_ids[good].tolist(), l_ids[good].tolist()))
    missed = sorted(set(range(1, n_true + 1)) - set(match))
    assert not missed, f"objects without a label of IoU >= {min_iou}: {missed[:10]} (of {len(missed)})"
    assert len(set(match.values())) == n_true, "two objects share a label"
    assert n_found == n_true, f"{n_found - n_true} extra labels (duplicates or pieces)"
    assert set(np.unique(labels)) == set(range(n_found + 1)), "ids are not 1..K"
    return match


@pytest.fixture(scope="module")
def scene():
    image, truth = tiled_scene(GRID)
    assert truth.max() >= 100
    return image, truth


class ObjectsOracle(FastOracle):
    """The fast oracle, scoring a click on the background 0 (as SAM scores most background
    clicks low), so that AMG keeps the objects only and skips upsampling the background's
    mask for each of the thousands of grid points that land on it."""

    def decode(self, features, points_xy=None, point_labels=None, boxes_xyxy=None,
               mask_input=None, multimask_output=True, cache=None):
        if boxes_xyxy is not None or mask_input is not None or points_xy is None or points_xy.shape[1] != 1:
            return super().decode(features, points_xy, point_labels, boxes_xyxy, mask_input,
                                  multimask_output, cache)
        img = self._image(features)
        rc = points_xy[:, 0].flip(-1).floor().long().clamp(0, self.image_size - 1).numpy()  # (B, 2)
        on_object = img[rc[:, 0], rc[:, 1]] > TOLERANCE
        n_masks, low = (3 if multimask_output else 1), self.image_size // 4
        logits = torch.full((len(rc), n_masks, low, low), -10.0)
        iou = torch.zeros(len(rc), n_masks)
        if on_object.any():
            keep = torch.from_numpy(np.flatnonzero(on_object))
            logits[keep], iou[keep] = super().decode(features, points_xy[keep], point_labels[keep],
                                                     None, None, multimask_output, cache)
        return logits, iou


def oracle_with_decoder(image_size: int = 1024) -> FastOracle:
    return with_instance_decoder(FastOracle(image_size))


# ---------------------------------------------------------------------------- 5000 x 3000
def test_ais_tiled_finds_every_object_once(scene):
    """AIS through the oracle decoder tile by tile (28 tiles of 1024, halo 128): every
    object, including those on interior borders, on tile edges, and larger than the halo
    across 2-4 tiles, is one label (IoU >= 0.9); nothing else is labelled."""
    image, truth = scene
    model = oracle_with_decoder()
    steps = []
    result = run_to_end(SamInstanceSegmenter(model, "ais").job(image, tiling="auto"), steps.append)
    assert model.encode_calls == len(GRID) == 28 and model.instance_decoder.calls == 28
    assert result.labels.shape == IMAGE_HW and result.labels.dtype == np.uint32
    assert result.n_objects == result.count == truth.max() and result.decoder_outputs is None
    one_to_one(result.labels, truth)
    assert steps[0].message.startswith("tile 1/28") and steps[-1].message == "stitching"
    fractions = [s.done / s.total for s in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1


# ---------------------------------------------------------------------------- smaller scenes
SMALL_GRID = TileGrid((1600, 1200), 512, 64)


@pytest.fixture(scope="module")
def small_scene():
    image, truth = tiled_scene(SMALL_GRID, seed=1, radius=(16, 26), n_random=20, per_border=2)
    return image, truth


def amg_params(grid: TileGrid) -> dict:
    """A grid of points every object gets at least one of: spacing <= smallest radius * sqrt 2."""
    return {"points_per_side": grid.tile_shape[0] // 21, "stability_score_thresh": 0.8, "decode_chunk": 64}


@pytest.mark.parametrize("size", ["small", pytest.param("5000x3000", marks=pytest.mark.slow)])
def test_amg_tiled_finds_every_object_once(small_scene, size):
    """AMG (a grid of point prompts per tile, masks cut at tile edges kept, as SAM keeps
    them) tile by tile with the oracle: every object once. CI: 1600 x 1200 in 12 tiles of
    512; the full 5000 x 3000 (416 tiles of 256, ~3 min on 2 cores) is marked slow."""
    if size == "small":
        grid, (image, truth) = SMALL_GRID, small_scene
    else:
        grid = TileGrid(IMAGE_HW, 256, 32)
        image, truth = tiled_scene(grid, radius=(16, 26))
    model = ObjectsOracle(grid.tile_shape[0])
    segmenter = SamInstanceSegmenter(model, "amg", amg=amg_params(grid))
    result = segmenter.segment(image, grid=grid)
    assert model.encode_calls == len(grid)
    one_to_one(result.labels, truth)


def test_apg_and_ais_tiled_from_stored_tiles_without_pixels(small_scene):
    """APG on a stored TiledEmbedding, AIS on tiles fetched one by one (``embedding_for``):
    no pixels, no encoder call, every object once."""
    image, truth = small_scene
    model = oracle_with_decoder(512)
    embedding = run_to_end(encode_tiles_job(TiledPredictor(model).predictor, image, SMALL_GRID))
    calls = model.encode_calls
    result = SamInstanceSegmenter(model, "apg").segment(embedding=embedding)
    assert model.encode_calls == calls and result.mode == "apg"
    one_to_one(result.labels, truth)
    asked = []
    result = SamInstanceSegmenter(model, "ais").segment(
        grid=SMALL_GRID, embedding_for=lambda k: asked.append(k) or embedding.tiles[k])
    assert asked == list(range(len(SMALL_GRID))) and model.encode_calls == calls
    one_to_one(result.labels, truth)


# ---------------------------------------------------------------------------- stitcher
def hand_made_tiles():
    """A 300 x 300 image in 2 x 2 tiles of 180 (halo 20: interiors split at 150, tiles
    overlap on [120, 180)); its truth, and per-tile label images with arbitrary ids, where
    the tiles disagree as decoders do near their edges."""
    grid = TileGrid((300, 300), 180, 20)
    truth = np.zeros((300, 300), np.int32)
    yy, xx = np.mgrid[:300, :300]
    truth[(yy - 150) ** 2 + (xx - 150) ** 2 <= 100**2] = 1  # a large object over all 4 tiles
    truth[5:15, 60:250] = 2  # two touching objects crossing a border
    truth[15:25, 60:250] = 3
    truth[(yy - 285) ** 2 + (xx - 150) ** 2 <= 8**2] = 4  # small, in the overlap: seen twice
    truth[60:70, 95:121] = 5  # tile 0's, touching tile 1's left edge (col 120) by one column
    truth[60:70, 121:200] = 6  # touching it, in tile 1's interior
    tiles = []
    rng = np.random.default_rng(0)
    for tile in grid.tiles:
        crop = truth[tile.outer_slices].copy()
        if tile.index == 1:
            crop[crop == 5] = 6  # tile 1 sees a sliver of 5 and takes it for part of 6
            crop[(crop == 3) & (np.arange(crop.shape[0])[:, None] < 17)] = 2  # and 2 / 3 differently
        ids = rng.permutation(np.arange(1, 50))[:7]  # arbitrary ids per tile
        tiles.append(np.where(crop > 0, ids[crop - 1] if crop.max() else 0, 0))
    return grid, truth, tiles


def test_stitcher_joins_cut_objects_and_keeps_touching_ones_apart():
    grid, truth, tiles = hand_made_tiles()
    out, count = stitch_tiles(grid, tiles)
    assert count == 6 and out.dtype == np.uint32
    match = one_to_one(out, truth)
    np.testing.assert_array_equal(out == match[1], truth == 1)  # cut in 4: whole again, exactly
    np.testing.assert_array_equal(out == match[5], truth == 5)  # not merged into 6 by the sliver
    np.testing.assert_array_equal(out == match[4], truth == 4)  # seen twice, once


def test_stitcher_writes_a_zarr_region_by_region_like_numpy(tmp_path):
    grid, truth, tiles = hand_made_tiles()
    expected, _ = stitch_tiles(grid, tiles)
    store = zarr.create_array(str(tmp_path / "labels.zarr"), shape=truth.shape, chunks=(64, 64),
                              dtype="uint32", fill_value=0)
    out, count = stitch_tiles(grid, tiles, out=store)
    assert out is store and count == 6
    np.testing.assert_array_equal(store[:], expected)


def test_stitcher_refuses_what_it_cannot_stitch():
    grid, _truth, tiles = hand_made_tiles()
    with pytest.raises(ValueError, match="shape"):
        TileStitcher(np.zeros((300, 299), np.uint32), grid)
    with pytest.raises(ValueError, match="min_overlap"):
        TileStitcher(np.zeros((300, 300), np.uint32), grid, min_overlap=0)
    stitcher = TileStitcher(np.zeros((300, 300), np.uint32), grid)
    with pytest.raises(ValueError, match="tile 1"):
        stitcher.add(grid.tiles[1], tiles[0][:-1])
    with pytest.raises(ValueError, match="expected 4 tile label images"):
        stitch_tiles(grid, tiles[:3])


# ---------------------------------------------------------------------------- stacks
class Recorder:
    """An array-like recording reads and writes of whole slices (a stand-in for zarr)."""

    def __init__(self, array, events, name):
        self.array, self.events, self.name = array, events, name
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        self.events.append((f"read {self.name}", key))
        return self.array[key]

    def __setitem__(self, key, value):
        self.events.append((f"write {self.name}", key))
        self.array[key] = value


def test_stack_streams_slice_by_slice_into_zarr_and_links_like_link_slices(tmp_path):
    """Tiled AIS on a stack written to a zarr array: equal to the in-memory run and to
    link_slices over the independently segmented slices; each slice is read, segmented,
    linked and written before the next is read."""
    image, _ = draw_objects((600, 500), grid=(4, 3), seed=5, radius=(20, 40))
    stack = np.stack([np.roll(image, 9 * z, axis=1) for z in range(3)])
    stack[2, :150] = 0  # objects leave: ids end
    segmenter = SamInstanceSegmenter(oracle_with_decoder(256), "ais")
    tiled = {"tiling": "on", "halo": 32}
    independent = np.stack([segmenter.segment(s, **tiled).labels for s in stack])
    expected = link_slices(independent).astype(np.uint32)
    assert segmenter.segment(stack[0], **tiled).count is not None  # tiled (6 tiles of 256)
    assert expected.max() >= 12 and len(np.unique(expected[2])) < len(np.unique(expected[0]))
    in_memory = run_to_end(segmenter.stack_job(stack, **tiled))
    np.testing.assert_array_equal(in_memory, expected)

    events = []
    store = zarr.create_array(str(tmp_path / "stack.zarr"), shape=stack.shape, chunks=(1, 128, 128),
                              dtype="uint32", fill_value=0)
    out = run_to_end(segmenter.stack_job(Recorder(stack, events, "stack"), out=Recorder(store, events, "out"),
                                         **tiled))
    assert out.array is store
    np.testing.assert_array_equal(store[:], expected)
    assert events == [(f"{what} {name}", z) for z in range(3) for what, name in (("read", "stack"), ("write", "out"))]


# ---------------------------------------------------------------------------- cancel
class CancelAfterBlocks:
    """An Event-like set once ``n`` encoder blocks have run (counted exactly, no timing)."""

    def __init__(self, model, n: int) -> None:
        self.blocks_run, self.n = 0, n
        for block in model.image_encoder.blocks:
            block.register_forward_hook(lambda *args: setattr(self, "blocks_run", self.blocks_run + 1))

    def is_set(self) -> bool:
        return self.blocks_run >= self.n


def test_cancel_stops_inside_the_tile_being_encoded():
    """Random-weight ViT (4 blocks per encode), 6 tiles, AMG: cancel set while tile 2 is
    encoded stops at the next block and the job returns None."""
    from napari_sam.model import SamConfig, ViTConfig, build_model

    torch.manual_seed(0)
    model = build_model(SamConfig("vit_b", "vit", ViTConfig(embed_dim=32, depth=4, num_heads=2,
                                                            global_attn_indexes=(1, 3)), img_size=128))
    image = np.random.default_rng(2).integers(0, 255, (330, 250), dtype=np.uint8)
    cancel = CancelAfterBlocks(model, 4 + 2)  # tile 1 whole, then 2 blocks of tile 2
    job = SamInstanceSegmenter(model, "amg", amg={"points_per_side": 2}).job(image, tiling="on", cancel=cancel)
    assert run_to_end(job) is None and cancel.blocks_run == 6


@pytest.mark.parametrize("mode", ["ais", "apg", "amg"])
def test_cancel_between_and_within_tiles_returns_none(mode):
    """Cancel set at the first step of tile 2: no further step, no further tile decoded."""
    image, _ = draw_objects((600, 500), grid=(3, 3), seed=1)
    model = with_instance_decoder(ObjectsOracle(256))
    cancel = threading.Event()
    job = SamInstanceSegmenter(model, mode, amg={"points_per_side": 8}).job(image, tiling="on", cancel=cancel)
    steps = []

    def on_step(step):
        steps.append(step.message)
        if step.message.startswith("tile 2/"):
            cancel.set()

    assert run_to_end(job, on_step) is None
    assert steps[-1] == "tile 2/9: encoding" and model.encode_calls == 2
    assert model.instance_decoder.calls == (0 if mode == "amg" else 1)


def test_tiled_job_writes_into_a_zarr_out(tmp_path):
    """``out=`` a zarr array: written tile region by tile region, equal to the numpy run;
    a wrong shape is refused before any work."""
    image, truth = draw_objects((600, 500), grid=(4, 3), seed=5, radius=(20, 40))
    segmenter = SamInstanceSegmenter(oracle_with_decoder(256), "ais")
    expected = segmenter.segment(image, tiling="on")
    store = zarr.create_array(str(tmp_path / "labels.zarr"), shape=image.shape, chunks=(100, 100),
                              dtype="uint32", fill_value=0)
    result = segmenter.segment(image, tiling="on", out=store)
    assert result.labels is store and result.n_objects == expected.n_objects == len(truth)
    np.testing.assert_array_equal(store[:], expected.labels)
    with pytest.raises(ValueError, match="shape"):
        segmenter.segment(image, tiling="on", out=np.zeros((600, 501), np.uint32))
