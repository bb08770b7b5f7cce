"""Coordinates between napari layers and SAM: planes, world <-> data, (row, col) <-> (x, y).

napari works in world coordinates ``(..., row, col)``; each layer maps its data
coordinates to world with scale, translate, rotate, shear and affine. SAM works on one 2D
plane of an image in ``(x, y)`` pixels. Everything that converts between the two lives here.

Conventions: ``*_rc`` arrays are ``(row, col)`` in a plane's data pixels (integer = pixel
centre, as in napari); ``*_xy`` arrays are ``(x, y) = (col, row)`` as SAM expects;
``box_xyxy`` is ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PlaneError(ValueError):
    """The viewer shows nothing of the image that SAM could segment (message for the user)."""


@dataclass(frozen=True)
class SlicePlane:
    """One displayed 2D plane of an image layer.

    Attributes:
        axes_rc: (row_axis, col_axis), the layer's data axes shown as rows and columns
            (normally the last two; swapped when the view is transposed).
        index: (ndim,) ints, the data index on every non-displayed axis, -1 on ``axes_rc``.
            It identifies the slice in caches: ``(7, -1, -1)`` is z = 7 of a (Z, Y, X) stack.
        shape_hw: (H, W) of the plane in pixels.
    """

    axes_rc: tuple[int, int]
    index: tuple[int, ...]
    shape_hw: tuple[int, int]

    @property
    def ndim(self) -> int:
        return len(self.index)

    @property
    def slicer(self) -> tuple:
        """Index for the layer data: the slice number on hidden axes, ``slice(None)`` on shown."""
        return tuple(slice(None) if a in self.axes_rc else i for a, i in enumerate(self.index))

    def describe(self) -> str:
        hidden = [f"axis {a} = {i}" for a, i in enumerate(self.index) if a not in self.axes_rc]
        return ", ".join(hidden) if hidden else "2D image"


def nearest(x):
    """The pixel whose centre is nearest: floor(x + 0.5) (halves go up, as napari's
    slider does; np.round's ties-to-even would split halves between pixels)."""
    return np.floor(np.asarray(x, dtype=float) + 0.5)


def base_data(layer):
    """The full-resolution data array of a layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def spatial_shape(layer) -> tuple[int, ...]:
    """Shape of the layer's spatial (non-RGB) axes, e.g. (Z, Y, X)."""
    shape = tuple(int(s) for s in base_data(layer).shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def current_plane(dims, layer) -> SlicePlane:
    """The plane of ``layer`` that the viewer shows.

    Args:
        dims: ``viewer.dims`` (world ``point``, ``displayed`` axes, ``ndisplay``).
        layer: an Image or Labels layer.
    Raises:
        PlaneError: 3D rendering, displayed axes outside the layer, or a slider position
            outside the layer's extent.
    """
    if dims.ndisplay != 2:
        raise PlaneError(
            "Segment Anything works on 2D views: switch the viewer to 2D (Ctrl-Y) and "
            "prompt slice by slice"
        )
    shape = spatial_shape(layer)
    ndim = len(shape)
    if ndim < 2:
        raise PlaneError(f"expected an image with at least 2 spatial axes, got {ndim}")
    offset = len(dims.point) - ndim  # layer axes align with the last world axes
    axes_rc = tuple(int(a) - offset for a in dims.displayed)
    if any(a < 0 for a in axes_rc):
        raise PlaneError(f"layer '{layer.name}' does not span the displayed axes")
    point = np.asarray(layer.world_to_data(np.asarray(dims.point)), dtype=float)
    index = []
    for axis in range(ndim):
        if axis in axes_rc:
            index.append(-1)
            continue
        i = int(nearest(point[axis]))
        if not 0 <= i < shape[axis]:
            raise PlaneError(
                f"layer '{layer.name}' has no data at this slider position (axis {axis})"
            )
        index.append(i)
    return SlicePlane(axes_rc, tuple(index), (shape[axes_rc[0]], shape[axes_rc[1]]))


def plane_image(layer, plane: SlicePlane) -> np.ndarray:
    """The pixels of ``plane``: (H, W) for a grayscale layer, (H, W, C) for an RGB(A) one."""
    return plane_pixels(base_data(layer), plane)


def plane_pixels(data, plane: SlicePlane) -> np.ndarray:
    """The pixels of ``plane`` of a layer's (full-resolution) data array; reads only this
    plane (dask, zarr), so a worker thread can call it with an array captured earlier."""
    return PlaneView(data, plane)[:, :]


class PlaneView:
    """One plane of a layer's data array as a lazy (H, W) or (H, W, C) array-like.

    ``view[rows, cols]`` (two slices) reads only that region of the plane from the
    underlying array (numpy, memmap, zarr, dask…): tiles of a huge plane are read one
    at a time, never the whole plane. Has ``shape``, ``dtype`` and ``ndim`` (what
    :func:`napari_sam.engine.tiling.read_tile` and the engine's tiled jobs need).
    """

    def __init__(self, data, plane: SlicePlane) -> None:
        self.data, self.plane = data, plane
        extra = tuple(int(s) for s in data.shape[plane.ndim:])  # RGB(A) channels
        self.shape = (*plane.shape_hw, *extra)
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, cols = (*key, slice(None), slice(None))[:2]
        if not (isinstance(rows, slice) and isinstance(cols, slice)) or len(key) > 2:
            raise ValueError(f"expected view[rows, cols] with two slices, got {key!r}")
        index = list(self.plane.slicer)
        index[self.plane.axes_rc[0]], index[self.plane.axes_rc[1]] = rows, cols
        out = np.asarray(self.data[tuple(index)])
        if self.plane.axes_rc[0] > self.plane.axes_rc[1]:  # transposed view: rows are the later axis
            out = np.swapaxes(out, 0, 1)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


def affine_between(src, dst, world_point=None) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``dst_data = A @ src_data + b`` for two layers in the same world.

    Built from the layers' public ``data_to_world`` / ``world_to_data`` on the basis
    points, so it honours scale, translate, rotate, shear and affine. Layers of different
    dimensionality align on their last axes (as napari draws them); world axes that
    ``src`` lacks are taken from ``world_point`` (e.g. ``viewer.dims.point``: a 3D Labels
    layer over a 2D image is written at the slider's z), 0 when it is None.
    Returns A (dst.ndim, src.ndim) and b (dst.ndim,).
    """
    n_world = max(src.ndim, dst.ndim, 0 if world_point is None else len(world_point))
    base = np.zeros(n_world) if world_point is None else np.asarray(world_point, dtype=float)
    base = np.concatenate([np.zeros(n_world - len(base)), base])

    def through_world(p):
        world = base.copy()
        world[n_world - src.ndim:] = np.asarray(src.data_to_world(p), dtype=float)
        return np.asarray(dst.world_to_data(world), dtype=float)

    b = through_world(np.zeros(src.ndim))
    cols = [through_world(e) - b for e in np.eye(src.ndim)]
    return np.stack(cols, axis=1), b


def map_coords(coords: np.ndarray, transform: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(N, d_src) coordinates -> (N, d_dst) through ``affine_between``'s (A, b)."""
    a, b = transform
    coords = np.asarray(coords, dtype=float).reshape(-1, a.shape[1])
    return coords @ a.T + b


def is_identity(transform: tuple[np.ndarray, np.ndarray], atol: float = 1e-6) -> bool:
    a, b = transform
    return a.shape[0] == a.shape[1] and np.allclose(a, np.eye(len(a)), atol=atol) and np.allclose(b, 0, atol=atol)


def on_plane(coords_data: np.ndarray, plane: SlicePlane) -> np.ndarray:
    """(N, ndim) data coordinates -> (N,) bool: rounds to this plane's index on hidden axes."""
    coords = np.asarray(coords_data, dtype=float).reshape(-1, plane.ndim)
    keep = np.ones(len(coords), dtype=bool)
    for axis, i in enumerate(plane.index):
        if axis not in plane.axes_rc:
            keep &= nearest(coords[:, axis]) == i
    return keep


def to_rc(coords_data: np.ndarray, plane: SlicePlane) -> np.ndarray:
    """(N, ndim) data coordinates -> (N, 2) (row, col) in the plane."""
    coords = np.asarray(coords_data, dtype=float).reshape(-1, plane.ndim)
    return coords[:, list(plane.axes_rc)]


def inside(points_rc: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """(N, 2) (row, col) -> (N,) bool: the point lies on a pixel of an (H, W) plane."""
    rc = np.asarray(points_rc, dtype=float).reshape(-1, 2)
    h, w = shape_hw
    return (rc[:, 0] >= -0.5) & (rc[:, 0] < h - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] < w - 0.5)


def rc_to_xy(points_rc: np.ndarray) -> np.ndarray:
    """(N, 2) (row, col) -> (N, 2) (x, y)."""
    return np.asarray(points_rc, dtype=float).reshape(-1, 2)[:, ::-1].copy()


def box_from_corners_rc(corners_rc: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray | None:
    """(M, 2) (row, col) corners of a shape -> (4,) box_xyxy clipped to the plane, or None
    when the box misses the plane entirely."""
    rc = np.asarray(corners_rc, dtype=float).reshape(-1, 2)
    (r0, c0), (r1, c1) = rc.min(axis=0), rc.max(axis=0)
    h, w = shape_hw
    if r1 < -0.5 or c1 < -0.5 or r0 >= h - 0.5 or c0 >= w - 0.5:
        return None
    r0, r1 = np.clip([r0, r1], 0, h - 1)
    c0, c1 = np.clip([c0, c1], 0, w - 1)
    return np.array([c0, r0, c1, r1], dtype=float)


def mask_indices(mask_hw: np.ndarray, plane: SlicePlane) -> tuple[np.ndarray, ...]:
    """(H, W) bool mask of a plane -> index tuple (ndim arrays) into the layer data."""
    rows, cols = np.nonzero(mask_hw)
    return rc_indices(rows, cols, plane)


def rc_indices(rows: np.ndarray, cols: np.ndarray, plane: SlicePlane) -> tuple[np.ndarray, ...]:
    """(N,) rows and (N,) cols of a plane -> index tuple (ndim arrays) into the layer data."""
    out = []
    for axis, i in enumerate(plane.index):
        if axis == plane.axes_rc[0]:
            out.append(rows)
        elif axis == plane.axes_rc[1]:
            out.append(cols)
        else:
            out.append(np.full(rows.shape, i, dtype=np.intp))
    return tuple(out)
