"""The one label writer (``write_objects``) on layer geometries napari can show, without Qt."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image, Labels

from napari_sam._napari.geometry import SlicePlane
from napari_sam._napari.labels_io import LabelsWriteError, undo_write, write_objects


@pytest.fixture
def stack():
    return Image(np.zeros((10, 20, 20), np.uint8), name="stack")


def square(r0=5, r1=15, c0=4, c1=12):
    mask = np.zeros((20, 20), np.int32)
    mask[r0:r1, c0:c1] = 1
    return mask


def plane(z):
    return SlicePlane((1, 2), (z, -1, -1), (20, 20))


def test_half_slice_z_offset_is_written():
    """A Labels layer shifted by half a slice: each image slice lands on the labels slice
    napari shows with it (rounding half up, as the slider does)."""
    image = Image(np.zeros((10, 20, 20), np.uint8))
    labels = Labels(np.zeros((10, 20, 20), np.uint16), translate=(0.5, 0, 0))
    for z in range(10):
        result = write_objects(labels, image, [plane(z)], square()[None], world_point=(z, 0, 0))
        assert result.label_ids, z
    assert (labels.data > 0).any(axis=(1, 2)).sum() >= 9


def test_coarser_z_labels_get_every_slice_written(stack):
    labels = Labels(np.zeros((5, 20, 20), np.uint16), scale=(2, 1, 1))
    written = [write_objects(labels, stack, [plane(z)], square()[None], world_point=(z, 0, 0)).label_ids
               for z in range(10)]
    assert (labels.data > 0).any(axis=(1, 2)).all()  # every labels slice got its object
    assert sum(map(len, written)) == 5  # the second image slice on a labels slice finds it taken


def test_propagated_object_into_coarser_z_labels_merges_slices(stack):
    labels = Labels(np.zeros((5, 20, 20), np.uint16), scale=(2, 1, 1))
    planes = [plane(z) for z in range(2, 8)]
    result = write_objects(labels, stack, planes, np.stack([square()] * 6))
    assert result.label_ids == [1]
    assert set(np.flatnonzero((labels.data == 1).any(axis=(1, 2)))) <= {1, 2, 3, 4}


def test_2d_labels_refuse_a_3d_object_and_change_nothing(stack):
    labels = Labels(np.zeros((20, 20), np.uint16))
    with pytest.raises(LabelsWriteError, match="several\\s+slices|shaped like the image"):
        write_objects(labels, stack, [plane(2), plane(3)], np.stack([square()] * 2))
    assert not labels.data.any()
    result = write_objects(labels, stack, [plane(4)], square()[None], world_point=(4, 0, 0))
    assert result.label_ids == [1]  # one slice under the slider is fine


def test_refine_replaces_only_on_the_given_slices(stack):
    labels = Labels(np.zeros((10, 20, 20), np.uint16))
    labels.data[:, 0:4, 0:4] = 7  # the old object, on every slice
    write_objects(labels, stack, [plane(z) for z in (3, 4)], np.stack([square()] * 2),
                  fixed_ids={1: 7}, replace_id=7)
    assert (labels.data[3:5, 0:4, 0:4] == 0).all()
    assert (labels.data[3:5, 5:15, 4:12] == 7).all()
    assert (labels.data[[0, 1, 2, 5, 6], 0:4, 0:4] == 7).all()  # other slices untouched


def test_undo_write_restores_only_untouched_pixels(stack):
    labels = Labels(np.zeros((10, 20, 20), np.uint16))
    result = write_objects(labels, stack, [plane(1)], square()[None])
    labels.data[1, 5, 4] = 9  # the user edited one pixel since
    restored, left = undo_write(result.record)
    assert left == 1 and restored == 10 * 8 - 1
    assert labels.data[1, 5, 4] == 9 and (labels.data == 1).sum() == 0
