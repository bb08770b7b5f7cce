"""The one label writer: image-space objects into any Labels layer, and reading objects back.

Commit, refine, propagation and segment-everything all write through :func:`write_objects`:

* **exactly where displayed**: it iterates over the *target* layer's pixels that lie on
  the image plane (labels data -> world -> image data, through the layers' own transforms)
  and samples the image-space object under each one. So a Labels layer at another scale,
  translate, rotation, affine, resolution or dimensionality than the image is written
  where napari shows the object (no dot grids at 2x resolution; a 3D Labels layer over a
  2D image is written at the slider's position, given as ``world_point``);
* **everything checked first**: ids, dtype range, layer type, target axes are checked
  before the layer is touched; a failure raises :class:`LabelsWriteError` and changes
  nothing;
* **one undo step or nothing**: all changes go in one ``data_setitem`` inside
  ``block_history()``; ``labels.undo()`` takes the whole write back;
* **no-overwrite rule**: unless ``overwrite``, pixels of other labels are left alone; an
  object with no pixel left to write is dropped and gets no id.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
from napari.layers import Labels

from .geometry import (
    SlicePlane,
    affine_between,
    base_data,
    is_identity,
    map_coords,
    nearest,
    rc_indices,
    spatial_shape,
)
from .prompt_layers import LABELS_ROLE, ROLE_KEY, copy_spatial, find_layer


class LabelsWriteError(ValueError):
    """A write was refused before anything changed (message for the user)."""


@dataclass(frozen=True)
class CommitResult:
    """What one write did.

    Attributes:
        label_ids: the id given to each written object, in object order.
        pixels: (K,) how many target pixels each written object got.
        skipped: (K,) how many of its pixels were left alone because they belong to
            another label (no-overwrite rule).
        covered: how many objects were dropped because every pixel of theirs was taken
            (they got no id).
    """

    label_ids: list[int]
    pixels: list[int]
    skipped: list[int]
    covered: int = 0
    record: WriteRecord | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class WriteRecord:
    """What one write changed, to take it back with :func:`undo_write` whatever layer is
    active (napari's own Ctrl-Z works only on the selected Labels layer).

    Attributes:
        layer: weak reference to the Labels layer.
        index: tuple of (N,) int arrays, the changed pixels.
        before, after: (N,) their values before and after the write.
    """

    layer: weakref.ref
    index: tuple
    before: np.ndarray
    after: np.ndarray


def undo_write(record: WriteRecord) -> tuple[int, int]:
    """Restore the pixels of ``record`` that still hold what the write put there, as one
    undo step of the layer (Ctrl-Z there redoes the write). Pixels edited since are left
    as they are. Returns (restored, left alone)."""
    labels = record.layer()
    if labels is None:
        raise LabelsWriteError("the labels layer of that commit is gone")
    data = base_data(labels)
    current = np.asarray(data[record.index])
    ours = current == record.after
    if ours.any():
        with labels.block_history():
            labels.data_setitem(tuple(a[ours] for a in record.index), record.before[ours], refresh=False)
        labels.refresh()
    return int(ours.sum()), int((~ours).sum())


def ensure_labels_layer(viewer, image, name: str = "SAM labels") -> Labels:
    """The napari-sam target Labels layer (uint32, same geometry as ``image``), created
    only if missing."""
    layer = find_layer(viewer, LABELS_ROLE)
    if layer is not None and spatial_shape(layer) == spatial_shape(image):
        return layer
    if layer is not None:  # made for another image: keep it, but as a plain Labels layer
        layer.metadata.pop(ROLE_KEY, None)
    return new_labels_layer(viewer, image, name, {ROLE_KEY: LABELS_ROLE})


def new_labels_layer(viewer, image, name: str, metadata: dict | None = None) -> Labels:
    """A new empty uint32 Labels layer over ``image`` (same shape and transform)."""
    layer = Labels(np.zeros(spatial_shape(image), dtype=np.uint32), name=name, metadata=metadata or {})
    copy_spatial(image, layer)  # before adding: the viewer's extent never jumps
    viewer.layers.append(layer)
    return layer


def next_free_id(labels: Labels) -> int:
    """max(label) + 1 (1 for an empty layer)."""
    data = base_data(labels)
    return int(np.asarray(data).max(initial=0)) + 1 if data.size else 1


def objects_to_ids(masks_hw: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """(K, H, W) bool object masks -> (H, W) int32 ids 1..K (0 = none). Where objects
    overlap, the first wins, or the last with ``overwrite`` (a later prompt paints over)."""
    masks_hw = np.asarray(masks_hw, dtype=bool)
    ids = np.zeros(masks_hw.shape[1:], dtype=np.int32)
    order = range(len(masks_hw)) if overwrite else range(len(masks_hw) - 1, -1, -1)
    for k in order:
        ids[masks_hw[k]] = k + 1
    return ids


class PlaneTargets:
    """The target layer's pixels shown on (part of) one image plane.

    Attributes:
        index: tuple of ``labels.ndim`` (N,) int arrays, the target pixels.
        rc: (N, 2) int (row, col) of the image-plane pixel under each target pixel.
    Args:
        region_rc: (r0, r1, c0, c1) inclusive image-plane box to cover (default: all).
        world_point: world position for axes the image lacks (``viewer.dims.point``).

    A target axis that the plane does not span (z of a stack) gets the one index the plane
    falls in; the others are enumerated and each target pixel is kept when its centre maps
    into the region (and, for oblique planes, within reach of the image slice).
    """

    MAX_PIXELS = 200_000_000  # refuse (instead of swapping) a target grid this large

    def __init__(self, labels, image, plane: SlicePlane, world_point=None, region_rc=None) -> None:
        h, w = plane.shape_hw
        r0, r1, c0, c1 = region_rc if region_rc is not None else (0, h - 1, 0, w - 1)
        shape = spatial_shape(labels)
        forward = affine_between(image, labels, world_point)
        if is_identity(forward) and shape == spatial_shape(image):  # same grid: direct
            rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
            self.index = rc_indices(rr.ravel(), cc.ravel(), plane)
            self.rc = np.stack([rr.ravel(), cc.ravel()], axis=1)
            return
        empty = tuple(np.zeros(0, np.intp) for _ in shape), np.zeros((0, 2), np.intp)
        # the region's corners (pixel edges) in target coordinates bound the candidates
        corners = np.array([[r, c] for r in (r0 - 0.5, r1 + 0.5) for c in (c0 - 0.5, c1 + 0.5)])
        q = map_coords(_plane_to_data(corners, plane), forward)  # (4, labels.ndim)
        a_plane = forward[0][:, list(plane.axes_rc)]  # how each target axis moves on the plane
        ranges = []
        for axis in range(len(shape)):
            if np.abs(a_plane[axis]).max() < 1e-9:  # not spanned by the plane: one index
                lo = hi = int(nearest(q[0, axis]))
            else:
                lo, hi = int(np.ceil(q[:, axis].min() - 1e-9)), int(np.floor(q[:, axis].max() + 1e-9))
            lo, hi = max(lo, 0), min(hi, shape[axis] - 1)
            if hi < lo:
                self.index, self.rc = empty
                return
            ranges.append(np.arange(lo, hi + 1))
        count = int(np.prod([len(r) for r in ranges], dtype=np.float64))
        if count > self.MAX_PIXELS:
            raise LabelsWriteError(f"expected a target region of at most {self.MAX_PIXELS} pixels, got {count}: "
                                   "the labels layer is far finer than the image")
        grid = np.stack([g.ravel() for g in np.meshgrid(*ranges, indexing="ij")], axis=1)  # (N, labels.ndim)
        backward = affine_between(labels, image, world_point)
        p = map_coords(grid, backward)  # image data coordinates of each target pixel centre
        keep = np.ones(len(grid), dtype=bool)
        for axis, i in enumerate(plane.index):
            if axis not in plane.axes_rc:  # oblique planes: within half a target pixel of the slice
                reach = 0.5 + 0.5 * np.abs(backward[0][axis]).sum()
                keep &= np.abs(p[:, axis] - i) <= reach + 1e-9
        rc = nearest(p[:, list(plane.axes_rc)]).astype(np.intp)
        keep &= (rc[:, 0] >= r0) & (rc[:, 0] <= r1) & (rc[:, 1] >= c0) & (rc[:, 1] <= c1)
        self.rc = rc[keep]
        self.index = tuple(grid[keep, a] for a in range(grid.shape[1]))


def _plane_to_data(points_rc: np.ndarray, plane: SlicePlane) -> np.ndarray:
    """(N, 2) (row, col) on a plane -> (N, ndim) image data coordinates."""
    out = np.tile(np.asarray(plane.index, dtype=float), (len(points_rc), 1))
    out[:, plane.axes_rc[0]], out[:, plane.axes_rc[1]] = points_rc[:, 0], points_rc[:, 1]
    return out


def labels_on_plane(labels: Labels, image, plane: SlicePlane, world_point=None, region=None) -> np.ndarray:
    """(H, W) the label value napari shows at each image pixel of ``plane`` (nearest target
    pixel; 0 outside the target layer); ``region`` (r0, c0, h, w): only that part, (h, w)."""
    transform = affine_between(image, labels, world_point)
    data, shape = base_data(labels), spatial_shape(labels)
    r0, c0, h, w = region if region is not None else (0, 0, *plane.shape_hw)
    if is_identity(transform) and shape == spatial_shape(image):
        from .geometry import PlaneView

        return PlaneView(data, plane)[r0 : r0 + h, c0 : c0 + w]
    rr, cc = np.mgrid[r0 : r0 + h, c0 : c0 + w]
    rc = np.stack([rr.ravel(), cc.ravel()], axis=1)
    coords = nearest(map_coords(_plane_to_data(rc, plane), transform)).astype(np.intp)
    ok = np.all((coords >= 0) & (coords < np.array(shape)), axis=1)
    values = np.zeros(len(coords), dtype=data.dtype)
    values[ok] = np.asarray(data[tuple(coords[ok, a] for a in range(coords.shape[1]))])
    return values.reshape(h, w)


def label_mask_on_plane(labels: Labels, image, plane: SlicePlane, label_id: int, world_point=None,
                        region=None) -> np.ndarray:
    """(H, W) bool: where object ``label_id`` of ``labels`` lies on the image plane (or
    (h, w) in ``region`` (r0, c0, h, w))."""
    return labels_on_plane(labels, image, plane, world_point, region) == label_id


def _check_target(labels) -> np.dtype:
    if not isinstance(labels, Labels):
        raise LabelsWriteError(f"expected a Labels layer to write into, got {type(labels).__name__}")
    if getattr(labels, "multiscale", False):
        raise LabelsWriteError(f"expected a single-resolution Labels layer, got the multiscale '{labels.name}': "
                               "napari-sam would only change its full-resolution level")
    data = base_data(labels)
    if "dask" in type(data).__module__:
        raise LabelsWriteError(f"expected writable labels, got a dask array in '{labels.name}': "
                               "load it into memory (or use a new layer)")
    dtype = np.dtype(data.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise LabelsWriteError(f"expected integer labels, got {dtype} in '{labels.name}'")
    return dtype


def _region(ids_hw: np.ndarray):
    rows, cols = np.nonzero(ids_hw.any(axis=1)), np.nonzero(ids_hw.any(axis=0))
    if rows[0].size == 0:
        return None
    return rows[0][0], rows[0][-1], cols[0][0], cols[0][-1]


def write_objects(
    labels: Labels,
    image,
    planes: list[SlicePlane],
    ids_hw: np.ndarray,
    *,
    world_point=None,
    overwrite: bool = False,
    fixed_ids: dict[int, int] | None = None,
    replace_id: int | None = None,
    offset_rc: tuple[int, int] = (0, 0),
) -> CommitResult:
    """Write objects given on image planes into ``labels`` as ONE undo step (or nothing).

    Args:
        planes: P image planes (e.g. one slice, or consecutive z slices).
        ids_hw: (P, H, W) int object numbers per plane (0 = none); one number is one
            object across planes (a propagated or linked 3D object).
        world_point: world position for axes the image lacks (``viewer.dims.point``).
        overwrite: also paint over pixels of other labels.
        fixed_ids: object number -> label id to use (e.g. the refined label's own id);
            other objects get new ids from max + 1, in object-number order.
        replace_id: refining: this label's pixels on ``planes`` that the new object does
            not cover are cleared, and its pixels may be painted over.
        offset_rc: (row, col) of ``ids_hw[p, 0, 0]`` on each plane: the ids cover only the
            (h, w) region there (e.g. objects of a tile of a large plane); outside it,
            no object.
    Where several planes fall on the same target pixels (a Labels layer with coarser z),
    a pixel gets the object of the last plane that has one there.
    Returns: what was written (:class:`CommitResult`).
    Raises:
        LabelsWriteError: nothing changed (dtype range, layer type, target axes…).
    """
    dtype = _check_target(labels)
    ids_hw = np.asarray(ids_hw)
    if ids_hw.ndim != 3 or len(ids_hw) != len(planes):
        raise LabelsWriteError(f"expected (P, H, W) object ids for {len(planes)} planes, got {ids_hw.shape}")
    _check_stack_axes(labels, image, planes, world_point)
    data = base_data(labels)
    fixed_ids = dict(fixed_ids or {})
    idx_parts, local_parts = [], []
    o_r, o_c = (int(v) for v in offset_rc)
    for plane, local_hw in zip(planes, ids_hw):
        h, w = local_hw.shape
        if min(o_r, o_c) < 0 or o_r + h > plane.shape_hw[0] or o_c + w > plane.shape_hw[1]:
            raise LabelsWriteError(f"expected objects inside the plane {plane.shape_hw}, got {local_hw.shape} "
                                   f"at {(o_r, o_c)}")
        region = _region(local_hw)
        region = None if region is None else (region[0] + o_r, region[1] + o_r, region[2] + o_c, region[3] + o_c)
        if replace_id is not None:  # also where the old object lies on this plane
            region = _union(region, _region(label_mask_on_plane(labels, image, plane, replace_id, world_point)))
        if region is None:
            continue
        targets = PlaneTargets(labels, image, plane, world_point, region)
        idx_parts.append(targets.index)
        rows, cols = targets.rc[:, 0] - o_r, targets.rc[:, 1] - o_c
        ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        values = np.zeros(len(rows), np.int64)
        values[ok] = local_hw[rows[ok], cols[ok]]
        local_parts.append(values)
    if not idx_parts or not sum(len(part) for part in local_parts):
        return CommitResult([], [], [], len(np.unique(ids_hw[ids_hw > 0])))
    index = tuple(np.concatenate(parts) for parts in zip(*idx_parts))
    local = np.concatenate(local_parts)
    index, local = _last_object_per_pixel(index, local, spatial_shape(labels))
    current = np.asarray(data[index]).astype(np.int64)
    free_pixel = (current == 0) | overwrite
    if replace_id is not None:
        free_pixel |= current == replace_id
    objects = np.unique(local[local > 0])
    allowed = (local > 0) & (free_pixel | (current == _map(local, fixed_ids)))  # own pixels: a no-op
    counts = {int(o): int(c) for o, c in zip(*np.unique(local[allowed], return_counts=True))}
    next_id = next_free_id(labels)
    ids: dict[int, int] = {}
    for obj in objects:
        obj = int(obj)
        if counts.get(obj, 0) == 0:
            continue
        if obj in fixed_ids:
            ids[obj] = int(fixed_ids[obj])
        else:
            while next_id in fixed_ids.values():
                next_id += 1
            ids[obj], next_id = next_id, next_id + 1
    if replace_id is not None and not ids:  # never remove an object without its replacement
        return CommitResult([], [], [], len(objects))
    top = max(ids.values(), default=0)
    if top > np.iinfo(dtype).max:
        raise LabelsWriteError(f"expected label ids <= {np.iinfo(dtype).max} for {dtype} labels, got {top}: "
                               f"'{labels.name}' is full; convert it to a larger dtype or use a new layer")
    new = current.copy()
    if replace_id is not None:
        new[current == replace_id] = 0  # the old object goes; the new one is written below
    write = allowed & np.isin(local, list(ids))
    new[write] = _map(local[write], ids)
    changed = new != current
    record = None
    if changed.any():
        where = tuple(a[changed] for a in index)
        record = WriteRecord(weakref.ref(labels), where, current[changed].astype(dtype), new[changed].astype(dtype))
        with labels.block_history():
            labels.data_setitem(where, record.after, refresh=False)
        labels.refresh()
    skipped = {int(o): int(c) for o, c in zip(*np.unique(local[(local > 0) & ~allowed], return_counts=True))}
    order = list(ids)
    return CommitResult([ids[o] for o in order], [counts[o] for o in order], [skipped.get(o, 0) for o in order],
                        int(len(objects) - len(ids)), record)


def _union(a, b):
    """Union of two (r0, r1, c0, c1) boxes (None = empty)."""
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def _last_object_per_pixel(index, local, shape):
    """One entry per target pixel: where several planes fall on the same pixel, keep the
    last plane's object there (an empty entry only when no plane has one)."""
    flat = np.ravel_multi_index(index, shape)
    order = np.lexsort((np.arange(len(flat)), local > 0, flat))  # by pixel, objects last
    flat_sorted = flat[order]
    last = np.r_[flat_sorted[1:] != flat_sorted[:-1], True]
    keep = order[last]
    return tuple(a[keep] for a in index), local[keep]


def _check_stack_axes(labels, image, planes, world_point) -> None:
    """Refuse planes at several positions of an image axis the labels layer lacks (a 2D
    Labels layer cannot hold a 3D object: only one slice would be kept, silently)."""
    if len(planes) < 2:
        return
    a = affine_between(image, labels, world_point)[0]
    for axis in range(planes[0].ndim):
        if axis in planes[0].axes_rc or np.abs(a[:, axis]).max() > 1e-9:
            continue
        if len({p.index[axis] for p in planes}) > 1:
            raise LabelsWriteError(f"expected a Labels layer with the image's axis {axis}, got '{labels.name}' "
                                   f"of shape {spatial_shape(labels)}: it cannot hold objects on several "
                                   "slices; choose (or create) a Labels layer shaped like the image")


def _map(values: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Apply an int -> int mapping to an array (values not in it map to -1)."""
    out = np.full(values.shape, -1, dtype=np.int64)
    for k, v in mapping.items():
        out[values == k] = v
    return out
