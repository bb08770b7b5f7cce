"""Writing SAM objects into a Labels layer (undoable) and reading existing objects back.

Every write goes through ``Labels.data_setitem`` inside ``Labels.block_history()``, so one
commit is one step of the layer's own undo history (``labels.undo()`` restores it).
The target layer may have a different geometry from the image (other scale, translate,
even resolution): pixels are mapped image data -> world -> labels data (nearest pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.layers import Labels

from .geometry import (
    SlicePlane,
    affine_between,
    base_data,
    is_identity,
    map_coords,
    mask_indices,
    plane_image,
    spatial_shape,
)
from .prompt_layers import LABELS_ROLE, ROLE_KEY, copy_spatial, find_layer


@dataclass(frozen=True)
class CommitResult:
    """What one commit wrote.

    Attributes:
        label_ids: the id given to each committed object, in prompt order.
        pixels: (K,) how many pixels each object got (after the no-overwrite rule).
        skipped: (K,) how many pixels of each object were left alone because they already
            belonged to another label.
    """

    label_ids: list[int]
    pixels: list[int]
    skipped: list[int]


def ensure_labels_layer(viewer, image, name: str = "SAM labels") -> Labels:
    """The napari-sam target Labels layer (uint32, same geometry as ``image``), created
    only if missing."""
    layer = find_layer(viewer, LABELS_ROLE)
    if layer is not None and spatial_shape(layer) == spatial_shape(image):
        return layer
    if layer is not None:  # made for another image: keep it, but as a plain Labels layer
        layer.metadata.pop(ROLE_KEY, None)
    layer = Labels(
        np.zeros(spatial_shape(image), dtype=np.uint32),
        name=name,
        metadata={ROLE_KEY: LABELS_ROLE},
    )
    copy_spatial(image, layer)  # before adding: the viewer's extent never jumps
    viewer.layers.append(layer)
    return layer


def next_free_id(labels: Labels) -> int:
    """max(label) + 1 (1 for an empty layer)."""
    data = base_data(labels)
    return int(np.asarray(data).max(initial=0)) + 1 if data.size else 1


class _Mapper:
    """Image-plane pixel indices -> labels data indices."""

    def __init__(self, labels: Labels, image, plane: SlicePlane) -> None:
        self.labels, self.plane = labels, plane
        self.shape = spatial_shape(labels)
        self.transform = affine_between(image, labels)
        self.direct = is_identity(self.transform) and self.shape == spatial_shape(image)

    def indices(self, mask_hw: np.ndarray) -> tuple[np.ndarray, ...]:
        idx = mask_indices(mask_hw, self.plane)
        if self.direct:
            return idx
        coords = np.rint(map_coords(np.stack(idx, axis=1), self.transform)).astype(np.intp)
        ok = np.all((coords >= 0) & (coords < np.array(self.shape)), axis=1)
        coords = np.unique(coords[ok], axis=0)
        return tuple(coords[:, a] for a in range(coords.shape[1]))

    def values_on_plane(self) -> np.ndarray:
        """(H, W) label values seen at each image pixel of the plane (0 outside)."""
        if self.direct:
            return plane_image(self.labels, self.plane)
        full = np.ones(self.plane.shape_hw, dtype=bool)
        idx = mask_indices(full, self.plane)
        coords = np.rint(map_coords(np.stack(idx, axis=1), self.transform)).astype(np.intp)
        ok = np.all((coords >= 0) & (coords < np.array(self.shape)), axis=1)
        values = np.zeros(len(coords), dtype=base_data(self.labels).dtype)
        data = base_data(self.labels)
        values[ok] = np.asarray(data[tuple(coords[ok, a] for a in range(coords.shape[1]))])
        return values.reshape(self.plane.shape_hw)


def label_mask_on_plane(labels: Labels, image, plane: SlicePlane, label_id: int) -> np.ndarray:
    """(H, W) bool: where object ``label_id`` of ``labels`` lies on the image plane."""
    return _Mapper(labels, image, plane).values_on_plane() == label_id


def commit_masks(
    labels: Labels,
    image,
    plane: SlicePlane,
    masks_hw: np.ndarray,
    label_ids: list[int | None] | None = None,
    overwrite: bool = False,
    replace_id: int | None = None,
) -> CommitResult:
    """Write K object masks of an image plane into ``labels`` as one undoable step.

    Args:
        masks_hw: (K, H, W) bool, in the image plane's pixels.
        label_ids: (K,) id per object; None entries get the next free ids.
        overwrite: also paint over pixels that already hold another label (and over
            earlier objects of this commit).
        replace_id: refinement of an existing object: its old pixels on this plane that the
            new mask does not cover are cleared first (only this id is ever cleared).
    """
    masks_hw = np.asarray(masks_hw, dtype=bool)
    if masks_hw.ndim != 3 or masks_hw.shape[1:] != tuple(plane.shape_hw):
        raise ValueError(f"expected masks of shape (K, {plane.shape_hw[0]}, {plane.shape_hw[1]}), got {masks_hw.shape}")
    label_ids = list(label_ids) if label_ids is not None else [None] * len(masks_hw)
    if len(label_ids) != len(masks_hw):
        raise ValueError(f"expected {len(masks_hw)} label ids, got {len(label_ids)}")
    mapper = _Mapper(labels, image, plane)
    data = base_data(labels)
    dtype_max = np.iinfo(data.dtype).max if np.issubdtype(data.dtype, np.integer) else np.inf
    free = next_free_id(labels)
    ids, pixels, skipped = [], [], []
    with labels.block_history():
        if replace_id is not None:
            old = mapper.values_on_plane() == replace_id
            stale = old & ~masks_hw.any(axis=0)
            if stale.any():
                idx = mapper.indices(stale)
                keep = np.asarray(data[idx]) == replace_id
                labels.data_setitem(tuple(a[keep] for a in idx), 0, refresh=False)
        for mask, wanted in zip(masks_hw, label_ids):
            if wanted is None:
                wanted, free = free, free + 1
            if wanted > dtype_max:
                raise ValueError(f"expected label ids <= {dtype_max} for {data.dtype} labels, got {wanted}")
            idx = mapper.indices(mask)
            current = np.asarray(data[idx])
            allowed = (current == 0) | (current == wanted) | overwrite
            labels.data_setitem(tuple(a[allowed] for a in idx), int(wanted), refresh=False)
            ids.append(int(wanted))
            pixels.append(int(allowed.sum()))
            skipped.append(int((~allowed).sum()))
    labels.refresh()
    return CommitResult(ids, pixels, skipped)


def commit_stack(
    labels: Labels,
    image,
    planes: list[SlicePlane],
    masks_hw: np.ndarray,
    label_id: int | None = None,
    overwrite: bool = False,
) -> CommitResult:
    """Write ONE object spanning several image planes (a propagated 3D object) into
    ``labels`` as one undoable step, with one id.

    Args:
        planes: K planes of the image (e.g. consecutive z slices).
        masks_hw: (K, H, W) bool, the object on each plane, in the image plane's pixels.
        label_id: the id to use (None: the next free id).
        overwrite: also paint over pixels that already hold another label.
    Returns: a :class:`CommitResult` with one entry (pixels summed over the planes).
    """
    masks_hw = np.asarray(masks_hw, dtype=bool)
    if masks_hw.ndim != 3 or len(planes) != len(masks_hw):
        raise ValueError(f"expected (K, H, W) masks for {len(planes)} planes, got {masks_hw.shape}")
    data = base_data(labels)
    dtype_max = np.iinfo(data.dtype).max if np.issubdtype(data.dtype, np.integer) else np.inf
    wanted = int(label_id) if label_id is not None else next_free_id(labels)
    if wanted > dtype_max:
        raise ValueError(f"expected label ids <= {dtype_max} for {data.dtype} labels, got {wanted}")
    pixels = skipped = 0
    with labels.block_history():
        for plane, mask in zip(planes, masks_hw):
            if mask.shape != tuple(plane.shape_hw):
                raise ValueError(f"expected masks of shape {plane.shape_hw}, got {mask.shape}")
            idx = _Mapper(labels, image, plane).indices(mask)
            current = np.asarray(data[idx])
            allowed = (current == 0) | (current == wanted) | overwrite
            labels.data_setitem(tuple(a[allowed] for a in idx), wanted, refresh=False)
            pixels += int(allowed.sum())
            skipped += int((~allowed).sum())
    labels.refresh()
    return CommitResult([wanted], [pixels], [skipped])
