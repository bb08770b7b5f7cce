"""Coordinates, prompt layers and labels writing without Qt (napari ViewerModel)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from napari.components import ViewerModel
from napari.layers import Image, Labels, Shapes

from napari_sam._napari import geometry as g
from napari_sam._napari.labels_io import (ensure_labels_layer, label_mask_on_plane, next_free_id,
                                         objects_to_ids, write_objects)
from napari_sam._napari.prompt_layers import (
    ensure_points_layer,
    ensure_preview_layer,
    read_boxes,
    read_points,
    rectangle_corners,
)


def dims(point, displayed=(1, 2), ndisplay=2):
    return SimpleNamespace(point=tuple(point), displayed=tuple(displayed), ndisplay=ndisplay)


@pytest.fixture
def stack():
    data = np.arange(5 * 30 * 50, dtype=np.uint16).reshape(5, 30, 50)
    return Image(data, scale=(2.0, 0.5, 0.25), translate=(10.0, -3.0, 4.0), name="stack")


def test_current_plane_follows_slider_with_scale_and_translate(stack):
    plane = g.current_plane(dims((10.0 + 2.0 * 3, 0, 0)), stack)
    assert plane == g.SlicePlane((1, 2), (3, -1, -1), (30, 50))
    assert plane.slicer == (3, slice(None), slice(None))
    assert np.array_equal(g.plane_image(stack, plane), stack.data[3])
    assert "axis 0 = 3" in plane.describe()


def test_current_plane_transposed_and_other_axes(stack):
    plane = g.current_plane(dims((0, -3.0 + 0.5 * 7, 0), displayed=(2, 0)), stack)
    assert plane.axes_rc == (2, 0) and plane.index == (-1, 7, -1) and plane.shape_hw == (50, 5)
    assert np.array_equal(g.plane_image(stack, plane), stack.data[:, 7, :].T)


def test_current_plane_refuses_what_it_cannot_segment(stack):
    with pytest.raises(g.PlaneError, match="2D"):
        g.current_plane(dims((0, 0, 0), displayed=(0, 1, 2), ndisplay=3), stack)
    with pytest.raises(g.PlaneError, match="no data at this slider"):
        g.current_plane(dims((100.0, 0, 0)), stack)
    flat = Image(np.zeros((20, 30)))
    assert g.current_plane(dims((4.0, 0, 0)), flat).index == (-1, -1)  # 2D layer in a 3D world
    with pytest.raises(g.PlaneError, match="does not span"):
        g.current_plane(dims((0, 0, 0), displayed=(0, 1)), flat)


def test_rgb_plane_and_time_series():
    rgb = Image(np.zeros((3, 20, 30, 3), np.uint8), rgb=True)
    plane = g.current_plane(dims((1.0, 0, 0)), rgb)
    assert plane.shape_hw == (20, 30) and g.plane_image(rgb, plane).shape == (20, 30, 3)
    tzyx = Image(np.zeros((2, 4, 20, 30), np.float32))
    plane = g.current_plane(dims((1.0, 2.0, 0, 0), displayed=(2, 3)), tzyx)
    assert plane.index == (1, 2, -1, -1)


def test_affine_between_layers_honours_all_transforms(stack):
    other = Labels(np.zeros((10, 60, 100), np.uint8), scale=(1.0, 0.25, 0.125), translate=(10.0, -3.0, 4.0))
    a, b = g.affine_between(stack, other)
    assert np.allclose(g.map_coords([[1, 2, 3]], (a, b)), [[2, 4, 6]])
    rotated = Image(np.zeros((40, 40)), rotate=30, translate=(5, 7))
    t = g.affine_between(rotated, rotated)
    assert g.is_identity(t)
    p = np.array([[3.0, 4.0]])
    world = np.asarray(rotated.data_to_world(p[0]))
    assert np.allclose(rotated.world_to_data(world), p[0])


def test_small_helpers():
    plane = g.SlicePlane((1, 2), (4, -1, -1), (6, 8))
    mask = np.zeros((6, 8), bool)
    mask[2, 3] = mask[5, 7] = True
    idx = g.mask_indices(mask, plane)
    assert [a.tolist() for a in idx] == [[4, 4], [2, 5], [3, 7]]
    assert g.inside([[-0.4, 0], [5.4, 7.4], [5.6, 0], [0, -0.6]], (6, 8)).tolist() == [True, True, False, False]
    assert np.array_equal(g.rc_to_xy([[1, 2]]), [[2, 1]])
    assert np.allclose(g.box_from_corners_rc([[1, 2], [4, 9]], (6, 8)), [2, 1, 7, 4])
    assert g.box_from_corners_rc([[10, 10], [20, 20]], (6, 8)) is None
    corners = rectangle_corners([4, 1, 2], [4, 3, 6], plane)
    assert corners.tolist() == [[4, 1, 2], [4, 1, 6], [4, 3, 6], [4, 3, 2]]


def test_prompts_are_read_through_world_coordinates(stack):
    viewer = ViewerModel()
    viewer.add_layer(stack)
    points = ensure_points_layer(viewer, stack)
    assert ensure_points_layer(viewer, stack) is points  # idempotent
    points.scale = (1.0, 1.0, 1.0)  # user changed the prompt layer: mapping still right
    points.translate = (0, 0, 0)
    plane = g.SlicePlane((1, 2), (3, -1, -1), (30, 50))
    w_in = stack.data_to_world([3, 10, 20])
    w_other_slice = stack.data_to_world([2, 10, 20])
    w_out = stack.data_to_world([3, 10, 80])
    points.add(np.array([w_in, w_other_slice, w_out]))
    points.features.loc[0, "positive"] = False
    rc, labels, outside = read_points(points, stack, plane)
    assert np.allclose(rc, [[10, 20]]) and labels.tolist() == [0] and outside == 1
    shapes = Shapes(ndim=3)
    shapes.add_rectangles(rectangle_corners(stack.data_to_world([3, 2, 3]), stack.data_to_world([3, 12, 40]), plane)[None])
    boxes, missed = read_boxes(shapes, stack, plane)
    assert np.allclose(boxes, [[3, 2, 40, 12]]) and missed == 0


def test_preview_layer_sits_on_the_slice(stack):
    viewer = ViewerModel()
    viewer.add_layer(stack)
    plane = g.SlicePlane((1, 2), (3, -1, -1), (30, 50))
    preview = ensure_preview_layer(viewer, stack, plane)
    assert preview.data.shape == (1, 30, 50)
    assert np.allclose(preview.data_to_world([0, 5, 7]), stack.data_to_world([3, 5, 7]))
    assert ensure_preview_layer(viewer, stack, plane) is preview


def test_commit_is_one_undo_step_and_never_overwrites(stack):
    viewer = ViewerModel()
    viewer.add_layer(stack)
    labels = ensure_labels_layer(viewer, stack)
    assert labels.data.shape == (5, 30, 50) and labels.data.dtype == np.uint32
    assert ensure_labels_layer(viewer, stack) is labels
    plane = g.SlicePlane((1, 2), (2, -1, -1), (30, 50))
    labels.data[2, 0:5, 0:5] = 7  # an existing object
    a = np.zeros((30, 50), bool)
    a[0:10, 0:10] = True
    b = np.zeros((30, 50), bool)
    b[5:15, 5:15] = True
    before = labels.data.copy()
    result = write_objects(labels, stack, [plane], objects_to_ids(np.stack([a, b]))[None])
    assert result.label_ids == [8, 9] and next_free_id(labels) == 10
    assert (labels.data[2, 0:5, 0:5] == 7).all()  # kept
    assert (labels.data[2, 5:10, 5:10] == 8).all()  # first object keeps the overlap
    assert result.skipped == [25, 0]  # a: 25 px of label 7; the overlap of b went to a
    labels.undo()
    assert np.array_equal(labels.data, before)
    labels.redo()
    result = write_objects(labels, stack, [plane], objects_to_ids(b[None], True)[None], overwrite=True)
    assert (labels.data[2, 5:15, 5:15] == result.label_ids[0]).all()


def test_commit_into_labels_at_twice_the_resolution_fills_every_pixel(stack):
    """Labels at twice the image resolution: every target pixel under the object is
    written (iterating over target pixels), not one in four."""
    fine = Labels(np.zeros((5, 60, 100), np.uint16), scale=(2.0, 0.25, 0.125),
                  translate=(10.0, -3.0 - 0.125, 4.0 - 0.0625))
    plane = g.SlicePlane((1, 2), (1, -1, -1), (30, 50))
    mask = np.zeros((30, 50), bool)
    mask[10:20, 10:30] = True
    write_objects(fine, stack, [plane], mask[None].astype(int), fixed_ids={1: 3})
    expected = np.zeros((60, 100), bool)
    expected[20:40, 20:60] = True
    np.testing.assert_array_equal(fine.data[1] == 3, expected)
    assert not fine.data[[0, 2, 3, 4]].any()
    assert np.array_equal(label_mask_on_plane(fine, stack, plane, 3), mask)
