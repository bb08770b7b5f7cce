"""InteractiveSegmenter without Qt (napari ViewerModel): image sizes and dtypes end to end.

The segmenter is the widget's logic; with ``auto_encode`` off and ``request_encoding(
wait=True)`` it runs without a Qt event loop, so sizes that would be slow in a GUI test
(4000 x 3000) are checked here.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_sam._napari.segmenter import InteractiveSegmenter
from napari_sam._napari.session import SamSession
from oracle import OracleSam


def iou(a, b) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def segmenter_for(image: np.ndarray, image_size: int = 256, **layer_kw):
    viewer = ViewerModel()
    layer = viewer.add_image(image, **layer_kw)
    session = SamSession()
    session.set_model(OracleSam(image_size=image_size))
    session.set_tiling("off")  # one squeezed encode per plane (tiled planes: test_napari_tiled.py)
    seg = InteractiveSegmenter(viewer, session)
    seg.auto_encode = False
    seg.set_image_layer(layer)
    assert seg.request_encoding(wait=True)
    return viewer, layer, seg


@pytest.mark.parametrize(
    ("shape", "dtype", "box"),
    [
        ((50, 80), np.uint8, (5, 45, 10, 70)),  # tiny, non-square
        ((3000, 4000), np.uint16, (800, 2200, 1000, 3100)),  # large
        ((300, 200), np.float32, (50, 250, 40, 160)),  # float, portrait
    ],
)
def test_sizes_and_dtypes(shape, dtype, box):
    image = np.zeros(shape, dtype)
    r0, r1, c0, c1 = box
    image[r0:r1, c0:c1] = 200 if dtype != np.float32 else 0.75
    viewer, layer, seg = segmenter_for(image, contrast_limits=(0, 255) if dtype != np.float32 else (0, 1))
    assert seg.add_point(layer.data_to_world([(r0 + r1) / 2, (c0 + c1) / 2]))
    result = seg.commit()
    assert result.label_ids == [1]
    truth = np.zeros(shape, bool)
    truth[r0:r1, c0:c1] = True
    assert iou(viewer.layers["SAM labels"].data == 1, truth) >= 0.9


def test_points_on_other_slices_wait_for_their_slice():
    stack = np.zeros((3, 160, 256), np.uint8)
    stack[0, 20:80, 20:100] = 90
    stack[2, 60:140, 120:220] = 180
    viewer, layer, seg = segmenter_for(stack)
    viewer.dims.set_point(0, 0)
    seg.add_point(layer.data_to_world([2, 100, 170]))  # on slice 2, not shown
    assert seg.prediction is None
    viewer.dims.set_point(0, 2)
    seg.request_encoding(wait=True)
    assert iou(seg.prediction.masks()[0], stack[2] > 0) >= 0.95
    seg.clear()
    assert len(seg.points_layer.data) == 0


def test_commit_without_prompts_and_empty_masks_say_why():
    viewer, layer, seg = segmenter_for(np.zeros((64, 64), np.uint8))
    assert seg.commit().label_ids == [] and "nothing to commit" in seg.last_status
    seg.positive = False
    seg.add_point(layer.data_to_world([30, 30]))  # negative only: empty mask
    assert seg.commit().label_ids == [] and "empty" in seg.last_status
    assert seg.refine_label(3) is False  # no labels layer yet


def test_affine_layer_clicks_land_on_the_right_object():
    image = np.zeros((160, 256), np.uint8)
    image[20:70, 30:110] = 80
    image[90:150, 140:240] = 160
    affine = np.array([[0.8, -0.5, 30.0], [0.5, 0.8, -12.0], [0.0, 0.0, 1.0]])  # rotation, scale, shift
    viewer, layer, seg = segmenter_for(image, affine=affine, scale=(1.0, 2.0))
    world = layer.data_to_world([120, 190])
    assert not np.allclose(world, [120, 190])
    seg.add_point(world)
    seg.commit()
    assert iou(viewer.layers["SAM labels"].data == 1, image == 160) >= 0.95
    assert np.allclose(viewer.layers["SAM labels"].affine.affine_matrix, layer.affine.affine_matrix)
