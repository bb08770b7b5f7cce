"""Large images in the napari widgets (issue 12): tiled clicks, tiled Segment Everything,
lazy (dask) and multiscale layers, tiled stores — through docked widgets and real clicks.

The 5000 x 3000 image holds small disks, a third of them on tile borders (interior borders
and tile edges); the oracle model (tests/oracle.py) knows every object, so a click that is
decoded on the wrong tile, or written at the wrong place, fails the IoU checks.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import dock
from oracle import OracleSam, with_instance_decoder
from qtpy.QtCore import Qt
from test_napari_first_hour import click
from test_tiling import _disk_image

from napari_sam.engine.tiling import TileGrid
from napari_sam.model.interrupt import raise_if_stopped

pytestmark = pytest.mark.gui

HW = (5000, 3000)
GRID = TileGrid(HW, 1024, 128)  # what "auto" gives for a 1024 model: 7 x 4 tiles


@pytest.fixture(scope="module")
def scene():
    """(image (H, W) uint8, truth labels (H, W) int32, centres [(r, c)]) of the disks."""
    return _disk_image(HW, GRID, np.random.default_rng(3), n_random=60)


def iou(a, b) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


class SlowOracle(OracleSam):
    """The oracle with an encoder taking ``delay`` seconds, checking the stop flag every
    20 ms (as the real encoders do between blocks); ``encode_calls`` counts finished
    encodes, ``stopped`` stopped ones."""

    def __init__(self, delay: float, **kw) -> None:
        super().__init__(**kw)
        self.delay, self.stopped = delay, 0

    def encode(self, x):
        end = time.monotonic() + self.delay
        while time.monotonic() < end:
            try:
                raise_if_stopped()
            except Exception:
                self.stopped += 1
                raise
            time.sleep(0.02)
        return super().encode(x)


def look_at(viewer, layer, rc, zoom_px: float = 2.0) -> None:
    """Centre the view on image pixel ``rc``, ``zoom_px`` screen pixels per image pixel."""
    world = layer.data_to_world(rc)
    viewer.camera.center = tuple(world[-2:])
    viewer.camera.zoom = zoom_px / float(np.min(layer.scale[-2:]))


def wait_mask(qtbot, widget, timeout=20000) -> None:
    qtbot.waitUntil(lambda: widget.segmenter.prediction is not None, timeout=timeout)


def border_objects(truth, centres, grid=GRID):
    """Object numbers whose centre lies on an interior border or a tile edge, and some not."""
    inner = {t.inner_rc[1] for t in grid.tiles} | {t.outer_rc[1] for t in grid.tiles}
    inner_c = {t.inner_rc[3] for t in grid.tiles} | {t.outer_rc[3] for t in grid.tiles}
    on = [k + 1 for k, (r, c) in enumerate(centres) if r in inner or c in inner_c]
    off = [k + 1 for k, (r, c) in enumerate(centres) if r not in inner and c not in inner_c]
    return on, off


def test_clicks_on_a_tiled_image_scaled_and_translated(viewer, qtbot, scene, tmp_path):
    """Clicks on objects in different tiles and on tile borders, with real mouse events on
    a scaled and translated layer: each object lands in the labels layer (IoU >= 0.9),
    each click encodes only the tile it needs (auto-encode off: nothing else)."""
    img, truth, centres = scene
    layer = viewer.add_image(img, name="mosaic", scale=(0.5, 0.8), translate=(10.0, -5.0))
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False
    model = OracleSam(1024)
    widget.set_model(model)
    assert widget.segmenter.tiles is not None and len(widget.segmenter.tiles) == len(GRID) == 28
    on, off = border_objects(truth, centres)
    picks = on[:4] + off[-2:]
    used_tiles = set()
    for n, k in enumerate(picks):
        r, c = centres[k - 1]
        look_at(viewer, layer, (r, c))
        qtbot.wait(30)
        before = model.encode_calls
        click(viewer, qtbot, layer.data_to_world((r, c)))
        wait_mask(qtbot, widget)
        tile = GRID.tile_at(r, c)
        new_tile = tile.index not in used_tiles
        used_tiles.add(tile.index)
        assert model.encode_calls - before == int(new_tile), (k, tile.index)  # one tile, or none
        if n == 0:
            assert model.encode_calls == 1  # the first mask after ONE tile encode
            status = widget.tiling.status_label.text()
            assert status == "tiled: 7 x 4 tiles of 1024 px (1/28 encoded)", status
            assert viewer.screenshot(str(tmp_path / "tiled_click.png"), canvas_only=False, flash=False) is not None
            preview = viewer.layers["SAM preview"]
            assert preview.data.size < 2 * 1024 * 1024  # the preview holds the object's region only
        qtbot.mouseClick(widget._commit, Qt.MouseButton.LeftButton)
        labels = viewer.layers["SAM labels"]
        assert iou(labels.data == labels.data.max(), truth == k) >= 0.9, (k, (r, c))
    assert len(np.unique(labels.data)) == len(picks) + 1
    assert model.encode_calls == len(used_tiles) < len(GRID)


def test_a_click_preempts_background_tiles_and_stop_works(viewer, qtbot, scene):
    """With auto-encode on, tiles in view are encoded in the background, nearest the view
    centre first; a click on a far tile stops the running encode and gets its own tile
    next: the mask comes after ONE finished encode. "Stop encoding" stops within a second."""
    img, truth, centres = scene
    layer = viewer.add_image(img, name="mosaic")
    widget = dock(viewer, "Segment Anything")
    viewer.reset_view()
    model = SlowOracle(1.5, image_size=1024)
    seg = widget.segmenter
    at_mask = []  # finished encodes when the first mask appeared
    seg.changed.connect(lambda: at_mask.append(model.encode_calls) if seg.prediction is not None else None)
    widget.set_model(model)  # starts the tiles in view, centre first
    qtbot.waitUntil(lambda: widget.segmenter.encoding, timeout=5000)
    k = next(k for k, (r, c) in enumerate(centres, 1) if r > 4100 and c > 2200)  # a corner tile
    r, c = centres[k - 1]
    before = model.encode_calls  # tiles near the centre finished so far (the GUI may lag)
    widget.add_point(layer.data_to_world((r, c)))
    wait_mask(qtbot, widget)
    assert at_mask[0] == before + 1 and model.stopped == 1  # the tile being encoded gave way
    assert widget.segmenter.tiles.cached(GRID.tile_at(r, c).index) is not None
    assert iou(widget.current_masks[0], truth == k) >= 0.9
    qtbot.waitUntil(lambda: model.encode_calls >= 2, timeout=10000)  # background goes on
    assert widget.tiling.stop_button.isEnabled()
    t0 = time.monotonic()
    qtbot.mouseClick(widget.tiling.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not widget.segmenter.encoding, timeout=3000)
    assert time.monotonic() - t0 < 1.0
    calls = model.encode_calls
    qtbot.wait(1500)
    assert model.encode_calls == calls  # paused until the next prompt


def test_tiling_controls_rekey_the_cache(viewer, qtbot, scene):
    """Tiling off/on and tile size change the keys: no stale tile is used; both widgets
    show the same settings."""
    img, truth, centres = scene
    layer = viewer.add_image(img, name="mosaic")
    widget = dock(viewer, "Segment Anything")
    everything = dock(viewer, "Segment Everything")
    widget.segmenter.auto_encode = False
    model = OracleSam(1024)
    widget.set_model(model)
    k = int(np.argmax(np.bincount(truth.ravel())[1:])) + 1  # the largest disk: resizing blurs least
    r, c = centres[k - 1]
    widget.add_point(layer.data_to_world((r, c)))
    wait_mask(qtbot, widget)
    assert model.encode_calls == 1
    widget.tiling._tile.setValue(768)  # as typed in the field
    assert everything.tiling._tile.value() == 768 and widget.session.tiling.tile_shape == (768, 768)
    wait_mask(qtbot, widget)  # the same prompt, decoded again on a 768 px tile
    assert model.encode_calls == 2
    assert widget.segmenter.tiles.grid.tile_shape == (768, 768)
    assert iou(widget.current_masks[0], truth == k) >= 0.9
    assert "tiled: " in everything.tiling.status_label.text() and "of 768 px" in everything.tiling.status_label.text()
    everything.tiling._mode.setCurrentIndex(everything.tiling._mode.findData("off"))
    assert widget.tiling._mode.currentData() == "off" and widget.segmenter.tiles is None
    assert widget.tiling.status_label.text().startswith("not tiled")
    everything.tiling._mode.setCurrentIndex(everything.tiling._mode.findData("auto"))
    everything.tiling._halo.setValue(600)  # refused: larger than half the (model input) tile
    assert widget.session.tiling.halo is None and everything.tiling._halo.value() == -1
    assert everything.tiling.status_label.text().startswith("not applied: expected a halo smaller")
    assert widget.segmenter.tiles.grid.halo == (96, 96)  # 768 px tiles, the default halo


def test_segment_everything_tiled_finds_every_object_once(viewer, qtbot, scene, tmp_path):
    """Segment Everything (AIS) on the tiled image: every object exactly once (IoU >= 0.9,
    no duplicates, no halves), tiles the interactive widget encoded are not encoded again,
    one undo step; cancel stops within a second and writes nothing."""
    img, truth, centres = scene
    layer = viewer.add_image(img, name="mosaic", scale=(0.5, 0.5))
    interactive = dock(viewer, "Segment Anything")
    interactive.segmenter.auto_encode = False
    model = with_instance_decoder(SlowOracle(0.0, image_size=1024))
    interactive.set_model(model)
    k = next(k for k, rc in enumerate(centres, 1) if GRID.tile_at(*rc).index == 1)
    interactive.add_point(layer.data_to_world(centres[k - 1]))  # tile 1 encoded (and cached)
    wait_mask(qtbot, interactive)
    assert model.encode_calls == 1
    widget = dock(viewer, "Segment Everything")
    widget.set_image_layer(layer)
    widget.set_mode("ais")
    model.delay = 3.0  # tile 0 takes 3 s to encode: Cancel lands inside the encoder
    assert widget.run(scope="slice", wait=False) is not None
    qtbot.wait(500)
    t0 = time.monotonic()
    qtbot.mouseClick(widget._cancel_button, Qt.MouseButton.LeftButton)
    assert widget.wait(5) and time.monotonic() - t0 < 1.0
    assert "SAM everything" not in viewer.layers and "cancelled" in widget.status
    assert model.stopped == 1 and model.encode_calls == 1
    model.delay = 0.0
    done = model.encode_calls
    assert widget.run(scope="slice", wait=False) is not None
    assert widget.wait(300), widget.status
    assert model.encode_calls == len(GRID)  # each tile once, whoever encoded it first
    assert done < len(GRID)
    labels = viewer.layers["SAM everything"]
    out = labels.data
    n = int(truth.max())
    ids = set()
    for k in range(1, n + 1):
        values, counts = np.unique(out[truth == k], return_counts=True)
        best = int(values[np.argmax(counts)])
        assert best and iou(out == best, truth == k) >= 0.9, k
        ids.add(best)
    assert len(ids) == n and len(np.unique(out)) == n + 1  # one id per object, nothing else
    assert "tiled: 7 x 4 tiles of 1024 px (28/28 encoded)" in widget.tiling.status_label.text()
    assert viewer.screenshot(str(tmp_path / "everything.png"), canvas_only=False, flash=False) is not None
    labels.undo()
    assert not labels.data.any()


class Recording:
    """An array-like over a numpy array that records every read: (main thread?, key)."""

    def __init__(self, array) -> None:
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim, self.size = array.shape, array.dtype, array.ndim, array.size

    def __getitem__(self, key):
        self.reads.append((threading.current_thread() is threading.main_thread(), key))
        return self.array[key]

    def __len__(self) -> int:
        return len(self.array)


def _box(key, shape):
    """(r0, r1, c0, c1) of a read's last two axes."""
    key = key if isinstance(key, tuple) else (key,)
    key = key + (slice(None),) * (len(shape) - len(key))
    rows, cols = key[-2], key[-1]
    r = range(*rows.indices(shape[-2]))
    c = range(*cols.indices(shape[-1]))
    return r.start, r.stop, c.start, c.stop


def test_dask_stack_is_read_one_tile_at_a_time(viewer, qtbot, scene):
    """A (2, 5000, 3000) dask stack: a click reads only the chunks of the one tile it
    needs, of the shown slice (napari's own display reads happen on the main thread)."""
    import dask
    import dask.array as da

    img, truth, centres = scene
    stack = np.zeros((2, *HW), np.uint8)
    stack[1] = img
    record = Recording(stack)
    lazy = da.from_array(record, chunks=(1, 512, 512), asarray=True)
    with dask.config.set(scheduler="synchronous"):  # chunk reads run in the reading thread
        layer = viewer.add_image(lazy, name="lazy", contrast_limits=(0, 255))
        widget = dock(viewer, "Segment Anything")
        widget.segmenter.auto_encode = False
        model = OracleSam(1024)
        widget.set_model(model)
        viewer.dims.set_point(0, 1)
        qtbot.wait(50)
        record.reads.clear()
        k = 5
        r, c = centres[k - 1]
        widget.add_point(layer.data_to_world((1, r, c)))
        wait_mask(qtbot, widget)
        ours = [key for main, key in record.reads if not main]
    assert model.encode_calls == 1 and ours
    tile = GRID.tile_at(r, c)
    r0, r1, c0, c1 = tile.outer_rc
    for key in ours:
        assert key[0] in (1, slice(1, 2, None)), key  # the shown slice only
        b0, b1, d0, d1 = _box(key, stack.shape)
        assert b1 > r0 and b0 < r1 and d1 > c0 and d0 < c1, key  # chunks of that tile
    assert len(ours) <= 9  # a 1024 tile spans at most 3 x 3 chunks of 512
    assert iou(widget.current_masks[0], truth == k) >= 0.9
    widget.commit()
    assert iou(viewer.layers["SAM labels"].data[1] == 1, truth == k) >= 0.9


def _big_disks(rng):
    """(5000, 3000) uint8 with disks of radius 20-30 (10-15 at level 1), and labels."""
    grid = TileGrid(HW, 2048, 256)
    return _disk_image(HW, grid, rng, n_random=30, radius=(20, 30))


def test_multiscale_layer_full_resolution_tiles_and_chosen_level(viewer, qtbot, tmp_path):
    """A 2-level pyramid: tiled, the widget works on level 0 (read a tile at a time, never
    whole); level 1 chosen in the Level field gives labels at level 1's geometry, exactly
    over the image — and into a full-resolution Labels layer where napari shows them."""
    img, truth, centres = _big_disks(np.random.default_rng(5))
    level0 = Recording(img)
    level1 = img[::2, ::2].copy()
    layer = viewer.add_image([level0, level1], name="pyramid", multiscale=True, contrast_limits=(0, 255),
                             scale=(0.4, 0.4), translate=(3.0, 7.0))
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False
    model = OracleSam(1024)
    widget.set_model(model)
    assert widget.tiling._level.isVisibleTo(widget) and widget.tiling._level.count() == 3
    assert widget.segmenter.source.level == 0 and widget.segmenter.tiles is not None
    qtbot.wait(50)
    level0.reads.clear()
    k = 3
    r, c = centres[k - 1]
    widget.add_point(layer.data_to_world((r, c)))
    wait_mask(qtbot, widget)
    ours = [key for main, key in level0.reads if not main]
    tile = TileGrid(HW, 1024, 128).tile_at(r, c)
    assert ours == [tile.outer_slices], ours  # exactly one tile of level 0 read
    widget.commit()
    labels = viewer.layers["SAM labels"]
    assert labels.data.shape == HW and iou(labels.data == 1, truth == k) >= 0.9
    # level 1, chosen as users do (tiling auto: 2500 px is tiled at full level-1 resolution)
    widget.tiling._level.setCurrentIndex(widget.tiling._level.findData(1))
    widget.tiling._level.activated.emit(widget.tiling._level.currentIndex())
    assert widget.segmenter.source.level == 1 and widget.session.chosen_level(layer) == 1
    assert widget.tiling.status_label.text() == "tiled: 3 x 2 tiles of 1024 px at level 1 (0/6 encoded)"
    viewer.layers.remove(labels)
    k = 7
    r, c = centres[k - 1]
    widget.add_point(layer.data_to_world((r, c)))
    wait_mask(qtbot, widget)
    widget.commit()
    low = viewer.layers["SAM labels"]
    assert low.data.shape == level1.shape
    assert np.allclose(low.data_to_world((10, 20)), layer.data_to_world((20, 40)))  # over level 1
    assert iou(low.data == 1, truth[::2, ::2] == k) >= 0.9
    full = viewer.add_labels(np.zeros(HW, np.uint32), name="full", scale=(0.4, 0.4), translate=(3.0, 7.0))
    widget.set_labels_layer(full)
    k = 9
    r, c = centres[k - 1]
    widget.add_point(layer.data_to_world((r, c)))
    wait_mask(qtbot, widget)
    widget.commit()
    assert iou(full.data == 1, truth == k) >= 0.85  # level-1 object drawn at full resolution
    shot = viewer.screenshot(str(tmp_path / "multiscale.png"), canvas_only=False, flash=False)
    assert shot is not None


def test_tiled_store_serves_tiles(viewer, qtbot, scene, tmp_path):
    """A 2D image with a tiled embedding store: precomputed tiles are read from the store,
    so after the session's cache is emptied a click costs no encoder call."""
    img, truth, centres = scene
    layer = viewer.add_image(img, name="mosaic")
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False
    model = OracleSam(1024)
    widget.set_model(model)
    store = widget.open_store(tmp_path / "mosaic.sam.zarr", wait=True)
    assert store is not None and store.grid == GRID, widget.status
    result = widget.precompute_store(wait=True)
    assert result.n_ready == len(GRID) and model.encode_calls == len(GRID)
    assert "28/28 tiles ready" in widget.volume._ready.text()
    widget.session.cache.invalidate()
    k = 11
    r, c = centres[k - 1]
    widget.add_point(layer.data_to_world((r, c)))
    wait_mask(qtbot, widget)
    assert model.encode_calls == len(GRID)  # from the store
    assert iou(widget.current_masks[0], truth == k) >= 0.9


def test_refine_a_label_on_a_tiled_plane(viewer, qtbot, scene):
    """Refining a committed object on a tiled plane: its mask (cropped to the tile) is the
    mask prompt, a new positive point adds a neighbour, commit replaces the label."""
    img, truth, centres = scene
    layer = viewer.add_image(img, name="mosaic")
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False
    widget.set_model(OracleSam(1024))
    tile = GRID.tiles[9]
    inside = [k for k, rc in enumerate(centres, 1) if GRID.tile_at(*rc) is tile]
    a, b = inside[:2]
    widget.add_point(layer.data_to_world(centres[a - 1]))
    wait_mask(qtbot, widget)
    label = widget.commit().label_ids[0]
    assert widget.refine_label(label)
    assert widget.segmenter.prediction.tiled  # shown as the label's region only
    widget.add_point(layer.data_to_world(centres[b - 1]))
    wait_mask(qtbot, widget)
    assert widget.commit().label_ids == [label]
    labels = viewer.layers["SAM labels"].data
    assert iou(labels == label, (truth == a) | (truth == b)) >= 0.9
    assert np.unique(labels).tolist() == [0, label]


def test_segment_everything_tiled_stack_links_slices(viewer, qtbot):
    """Scope "stack" on tiled slices (a dask stack, a 512 px model): every
    object of each slice once, the same object on both slices one id (linked)."""
    import dask.array as da

    hw, size = (1500, 1100), 512
    grid = TileGrid(hw, size, size // 8)
    img, truth, _ = _disk_image(hw, grid, np.random.default_rng(8), n_random=20)
    stack = da.from_array(np.stack([img, img]), chunks=(1, 512, 512))
    viewer.add_image(stack, name="stack", contrast_limits=(0, 255))
    widget = dock(viewer, "Segment Everything")
    model = with_instance_decoder(OracleSam(size))
    widget.session.set_model(model)
    widget.set_mode("ais")
    assert "tiled: 4 x 3 tiles of 512 px" in widget.tiling.status_label.text()
    assert widget.run(scope="stack", wait=False) is not None
    assert widget.wait(300), widget.status
    assert model.encode_calls == 2 * len(grid)
    out = viewer.layers["SAM everything"].data
    n = int(truth.max())
    for z in range(2):
        ids = set()
        for k in range(1, n + 1):
            values, counts = np.unique(out[z][truth == k], return_counts=True)
            best = int(values[np.argmax(counts)])
            assert best and iou(out[z] == best, truth == k) >= 0.9, (z, k)
            ids.add(best)
        assert len(ids) == n and len(np.unique(out[z])) == n + 1
    assert (out[0] == out[1]).all()  # linked: one id per object through the stack
