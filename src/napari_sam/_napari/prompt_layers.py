"""The layers napari-sam works with: prompts (Points, Shapes), the live preview (Labels).

Layers are found by their role (``layer.metadata["napari_sam_role"]``), so renaming them is
harmless, and created only when missing (idempotent). Prompt layers copy the image layer's
scale / translate / rotate / shear / affine so they overlay the image; prompts are still
read through world coordinates (``data_to_world`` -> image ``world_to_data``), so a user
who changes a transform afterwards gets correct results.
"""

from __future__ import annotations

import logging

import numpy as np
from napari.layers import Labels, Points, Shapes
from napari.utils.transforms import Affine

from .geometry import (
    SlicePlane,
    affine_between,
    box_from_corners_rc,
    inside,
    map_coords,
    on_plane,
    spatial_shape,
    to_rc,
)

log = logging.getLogger(__name__)

ROLE_KEY = "napari_sam_role"
POINTS_ROLE, BOXES_ROLE, PREVIEW_ROLE, LABELS_ROLE = "points", "boxes", "preview", "labels"
POSITIVE_COLOR, NEGATIVE_COLOR = "lime", "#ff2d6f"


def find_layer(viewer, role: str):
    """The first layer of ``viewer`` with this napari-sam role, or None."""
    for layer in viewer.layers:
        if layer.metadata.get(ROLE_KEY) == role:
            return layer
    return None


def has_role(layer, *roles: str) -> bool:
    return layer.metadata.get(ROLE_KEY) in roles


def copy_spatial(src, dst) -> None:
    """Give ``dst`` the data -> world transform of ``src`` (same ndim)."""
    dst.scale = src.scale
    dst.translate = src.translate
    dst.rotate = src.rotate
    dst.shear = src.shear
    dst.affine = src.affine


def _marker_size(image) -> float:
    """Prompt marker size in data pixels: 1.2% of the image, at most that of a 1536 px
    image (a click on a small object of a huge image must not hide it)."""
    return float(max(3.0, 0.012 * min(max(spatial_shape(image)[-2:]), 1536)))


def _reusable_layer(viewer, role: str, ndim: int):
    """Our layer with ``role`` if it fits an ``ndim`` image; one that does not is removed."""
    layer = find_layer(viewer, role)
    if layer is not None and layer.ndim != ndim:
        viewer.layers.remove(layer)
        layer = None
    return layer


def ensure_points_layer(viewer, image) -> Points:
    """The prompt Points layer (feature ``positive``: True = object, False = background)."""
    layer = _reusable_layer(viewer, POINTS_ROLE, image.ndim)
    if layer is None:
        layer = Points(
            ndim=image.ndim,
            name="SAM points",
            features={"positive": np.zeros(0, dtype=bool)},
            feature_defaults={"positive": True},
            face_color="positive",
            face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR},
            border_color="white",
            size=_marker_size(image),
            canvas_size_limits=(6, 10000),  # zoomed out on a huge image: still visible
            metadata={ROLE_KEY: POINTS_ROLE},
        )
        copy_spatial(image, layer)  # before adding: the viewer's extent never jumps
        viewer.layers.append(layer)
    copy_spatial(image, layer)
    return layer


def ensure_boxes_layer(viewer, image) -> Shapes:
    """The prompt Shapes layer; every shape's bounding box is a box prompt."""
    layer = _reusable_layer(viewer, BOXES_ROLE, image.ndim)
    if layer is None:
        layer = Shapes(
            ndim=image.ndim,
            name="SAM boxes",
            edge_color="yellow",
            face_color="transparent",
            edge_width=max(1.0, _marker_size(image) / 4),
            metadata={ROLE_KEY: BOXES_ROLE},
        )
        copy_spatial(image, layer)
        viewer.layers.append(layer)
    copy_spatial(image, layer)
    return layer


PREVIEW_COLORS = ("cyan", "magenta", "yellow", "#4d9dff", "#7dff4d", "#ff9d4d")


def preview_colormap():
    """Fixed, saturated colours for previewed objects (1 = cyan, 2 = magenta, …), so a
    preview never looks like a committed label (napari's label colours are random)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {0: "transparent", None: PREVIEW_COLORS[0]}
    colors.update({k: PREVIEW_COLORS[(k - 1) % len(PREVIEW_COLORS)] for k in range(1, 256)})
    return DirectLabelColormap(color_dict=colors)


def raise_prompt_layers(viewer) -> None:
    """Keep napari-sam's preview, boxes and points layers on top of the layer list (in that
    order, points topmost), so a newly added image never hides them."""
    for role in (PREVIEW_ROLE, BOXES_ROLE, POINTS_ROLE):
        layer = find_layer(viewer, role)
        if layer is not None:
            i = viewer.layers.index(layer)
            if i != len(viewer.layers) - 1:
                viewer.layers.move(i, len(viewer.layers))


def ensure_preview_layer(viewer, image, plane: SlicePlane, region=None) -> Labels:
    """The preview Labels layer holding one plane (size 1 on hidden axes), placed on the
    image's slice ``plane`` — memory stays O(H x W) even for large stacks. ``region``
    (r0, c0, h, w) limits it to that part of the plane (tiled planes: the previewed
    objects' region, so a huge plane never gets a plane-sized preview)."""
    r0, c0, h, w = region if region is not None else (0, 0, *plane.shape_hw)
    sizes = {plane.axes_rc[0]: h, plane.axes_rc[1]: w}
    shape = tuple(sizes.get(a, 1) for a in range(plane.ndim))
    layer = find_layer(viewer, PREVIEW_ROLE)
    if layer is not None and layer.ndim != len(shape):
        viewer.layers.remove(layer)
        layer = None
    new = layer is None
    if new:
        layer = Labels(
            np.zeros(shape, dtype=np.uint8),
            name="SAM preview",
            opacity=0.6,
            colormap=preview_colormap(),
            metadata={ROLE_KEY: PREVIEW_ROLE},
        )
    # shift by the slice index and the region: world(p') = image_world(p' + offset)
    offset = np.array([0 if a in plane.axes_rc else i for a, i in enumerate(plane.index)], float)
    offset[plane.axes_rc[0]], offset[plane.axes_rc[1]] = r0, c0
    linear = Affine(scale=image.scale, rotate=image.rotate, shear=image.shear).linear_matrix
    translate = np.asarray(image.translate, float) + linear @ offset
    if new or not _same_spatial(image, layer, translate):  # each change redraws: only if needed
        copy_spatial(image, layer)
        layer.translate = translate
    if not new and layer.data.shape != shape:
        layer.data = np.zeros(shape, dtype=np.uint8)
        _set_drawn(layer, plane, (0, 0, 0, 0))
    layer.metadata["napari_sam_plane"] = plane
    layer.metadata["napari_sam_region"] = (r0, c0, h, w)
    if new:  # add it placed: the viewer's extent and slider never jump
        _set_drawn(layer, plane, (0, 0, 0, 0))
        viewer.layers.append(layer)
    return layer


def _same_spatial(image, layer, translate) -> bool:
    """``layer`` already has ``image``'s scale, rotate, shear and affine, and ``translate``."""
    pairs = [(image.scale, layer.scale), (image.rotate, layer.rotate), (image.shear, layer.shear),
             (image.affine.affine_matrix, layer.affine.affine_matrix), (translate, layer.translate)]
    return all(np.shape(a) == np.shape(b) and np.allclose(a, b) for a, b in pairs)


def preview_plane_view(layer: Labels, plane: SlicePlane) -> np.ndarray:
    """A writable (H, W) view of the preview layer's data for ``plane``."""
    view = layer.data[tuple(slice(None) if a in plane.axes_rc else 0 for a in range(plane.ndim))]
    return view.T if plane.axes_rc[0] > plane.axes_rc[1] else view


def show_preview(layer: Labels, plane: SlicePlane, ids_hw: np.ndarray | None, offset_rc=(0, 0)) -> None:
    """Write (h, w) object ids (0 = none) into the preview at ``offset_rc`` (row, col) of
    its plane view and refresh it; None clears. Only the box written last time and the
    new box are touched (a click changes a mask, not the plane); the refresh skips the
    thumbnail, extent and highlight, which a live preview does not need."""
    view = preview_plane_view(layer, plane)
    drawn = _drawn_box(layer, plane)
    if drawn is not None and (drawn[1] > view.shape[0] or drawn[3] > view.shape[1]):
        drawn = None  # not this layer's data any more: clear it all
    if ids_hw is None:
        if drawn is None and not view.any():
            _set_drawn(layer, plane, (0, 0, 0, 0))  # known empty: the next draw is in place
            return
        clear = (slice(drawn[0], drawn[1]), slice(drawn[2], drawn[3])) if drawn is not None else ...
        view[clear] = 0
        box = (0, 0, 0, 0)
    else:
        r0, c0 = (int(v) for v in offset_rc)
        box = (r0, r0 + ids_hw.shape[0], c0, c0 + ids_hw.shape[1])
        if drawn is None:
            view[...] = 0
        else:
            view[drawn[0] : drawn[1], drawn[2] : drawn[3]] = 0
        view[box[0] : box[1], box[2] : box[3]] = ids_hw
    _set_drawn(layer, plane, box)
    changed = _union_box(drawn, box)
    if changed is not None and _refresh_region(layer, plane, changed):
        return
    try:
        layer.refresh(thumbnail=False, extent=False, highlight=False)
    except TypeError:  # napari without refresh options
        layer.refresh()


def _set_drawn(layer: Labels, plane: SlicePlane, box) -> None:
    """Remember the (r0, r1, c0, c1) box of ``plane``'s view written last, with the
    plane's (row, col) data axes: the same data seen with swapped axes is another view."""
    layer.metadata["napari_sam_drawn"] = (tuple(plane.axes_rc), tuple(box))


def _drawn_box(layer: Labels, plane: SlicePlane):
    """The box :func:`_set_drawn` stored, in ``plane``'s view; None when unknown or
    written through another orientation (the caller then clears the whole view)."""
    drawn = layer.metadata.get("napari_sam_drawn")
    if not drawn or len(drawn) != 2 or tuple(drawn[0]) != tuple(plane.axes_rc):
        return None
    return drawn[1]


def _union_box(a, b):
    """The (r0, r1, c0, c1) box covering boxes ``a`` and ``b`` (empty ones ignored); None
    when ``a`` is unknown."""
    if a is None:
        return None
    boxes = [x for x in (a, b) if x[1] > x[0] and x[3] > x[2]]
    if not boxes:
        return (0, 0, 0, 0)
    return (min(x[0] for x in boxes), max(x[1] for x in boxes), min(x[2] for x in boxes), max(x[3] for x in boxes))


_fallback_logged = False


def _refresh_region(layer: Labels, plane: SlicePlane, box) -> bool:
    """Redraw only ``box`` (r0, r1, c0, c1) of the preview's plane: napari's own partial
    update for painted labels (the displayed slice's colours there, one sub-texture
    upload) instead of re-slicing and uploading the whole plane. False (caller refreshes
    everything) where that path does not apply or fails: it uses napari internals, so
    another napari version, 3D display, a slice not yet loaded or displayed axes other
    than the plane's (row, col) all fall back to the public full refresh."""
    global _fallback_logged
    r0, r1, c0, c1 = box
    if r1 <= r0 or c1 <= c0:
        return True  # nothing changed on screen
    try:
        return _partial_refresh(layer, plane, box)
    except Exception:  # napari internals (and vispy behind them): refresh in full
        if not _fallback_logged:
            _fallback_logged = True
            log.debug("napari-sam: in-place preview redraw failed; full refreshes instead", exc_info=True)
        return False


def _partial_refresh(layer: Labels, plane: SlicePlane, box) -> bool:
    """:func:`_refresh_region`'s use of napari's internals; False where they do not apply."""
    r0, r1, c0, c1 = box
    displayed = tuple(layer._slice_input.displayed)
    view = layer._slice.image.view
    raw = layer._slice.image.raw
    if (displayed != tuple(plane.axes_rc) or view.shape != raw.shape or not layer.loaded
            or layer._updated_slice is not None or raw.shape != preview_plane_view(layer, plane).shape):
        return False
    # the displayed slice must be the layer's current data (napari's own test before it
    # paints in place), else a stale slice would be drawn
    if not (isinstance(layer.data, np.ndarray) and np.shares_memory(layer.data, raw)):
        return False
    if layer.contour > 0:  # a contour changes up to its width around the box
        pad = max(1, int(layer.contour))
        r0, r1, c0, c1 = max(0, r0 - pad), min(raw.shape[0], r1 + pad), max(0, c0 - pad), min(raw.shape[1], c1 + pad)
    region = (slice(r0, r1), slice(c0, c1))
    if hasattr(layer, "_raw_to_displayed"):  # napari's colours, contours included
        view[region] = layer._raw_to_displayed(raw, data_slice=region)
    elif layer.contour == 0:
        view[region] = layer.colormap._data_to_texture(raw[region])
    else:
        return False
    full = [slice(None)] * layer.ndim
    full[plane.axes_rc[0]], full[plane.axes_rc[1]] = region
    layer._updated_slice = tuple(full)
    try:
        layer._partial_labels_refresh()
    finally:
        layer._updated_slice = None  # napari's pending-update state never outlives the call
    return True


def read_points(points: Points, image, plane: SlicePlane, adding=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Point prompts of ``plane``.

    Args:
        adding: (ndim,) data coordinates of a point about to be added with the layer's
            default polarity (``feature_defaults``), read as its last point; None: none.
    Returns:
        points_rc (N, 2) float (row, col) in image data pixels, point_labels (N,) int
        (1 positive, 0 negative), and how many points of this plane fell outside the image.
    """
    data = np.asarray(points.data, dtype=float)
    if "positive" in points.features:
        positive = np.asarray(points.features["positive"], dtype=bool)
    else:
        positive = np.ones(len(data), dtype=bool)
    if adding is not None:
        default = points.feature_defaults.get("positive", [True])
        data = np.concatenate([data.reshape(-1, points.ndim), np.asarray(adding, float).reshape(1, -1)])
        positive = np.append(positive, bool(np.asarray(default)[0]))
    if len(data) == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=int), 0
    coords = map_coords(data, affine_between(points, image))
    keep = on_plane(coords, plane)
    rc = to_rc(coords[keep], plane)
    positive = positive[keep]
    ok = inside(rc, plane.shape_hw)
    return rc[ok], positive[ok].astype(int), int((~ok).sum())


def read_boxes(shapes: Shapes, image, plane: SlicePlane) -> tuple[np.ndarray, int]:
    """Box prompts of ``plane``: (K, 4) float box_xyxy in image data pixels (each shape's
    bounding box, clipped to the image), and how many of this plane missed the image."""
    if len(shapes.data) == 0:
        return np.zeros((0, 4)), 0
    transform = affine_between(shapes, image)
    boxes, missed = [], 0
    for vertices in shapes.data:
        coords = map_coords(vertices, transform)
        if not on_plane(coords, plane).all():
            continue
        box = box_from_corners_rc(to_rc(coords, plane), plane.shape_hw)
        if box is None:
            missed += 1
        else:
            boxes.append(box)
    return (np.stack(boxes) if boxes else np.zeros((0, 4))), missed


def prompt_indices_on_plane(layer, image, plane: SlicePlane) -> list[int]:
    """Indices of the points / shapes of a prompt layer that lie on ``plane``."""
    if len(layer.data) == 0:
        return []
    transform = affine_between(layer, image)
    if isinstance(layer, Points):
        return np.nonzero(on_plane(map_coords(layer.data, transform), plane))[0].tolist()
    return [i for i, v in enumerate(layer.data) if on_plane(map_coords(v, transform), plane).all()]


def remove_prompts(layer, indices) -> None:
    """Remove points / shapes by index through the layer's own API."""
    if len(indices) == 0:
        return
    layer.selected_data = set(int(i) for i in indices)
    layer.remove_selected()


def rectangle_corners(corner0, corner1, plane: SlicePlane) -> np.ndarray:
    """Two opposite (ndim,) data corners -> (4, ndim) rectangle vertices in ``plane``."""
    c0, c1 = np.asarray(corner0, float), np.asarray(corner1, float)
    r_ax, c_ax = plane.axes_rc
    out = np.repeat(c0[None], 4, axis=0)
    for k, (r, c) in enumerate(((c0[r_ax], c0[c_ax]), (c0[r_ax], c1[c_ax]),
                                (c1[r_ax], c1[c_ax]), (c1[r_ax], c0[c_ax]))):
        out[k, r_ax], out[k, c_ax] = r, c
    return out


def add_point(points: Points, position_world, positive: bool, default_positive: bool) -> None:
    """Add one point at a world position with the given polarity, through the layer API
    (the layer's default polarity is restored to ``default_positive`` afterwards)."""
    points.selected_data = set()  # else changing the defaults recolours the selection
    points.feature_defaults = {"positive": bool(positive)}
    try:
        points.add(np.asarray(points.world_to_data(position_world), dtype=float)[None])
    finally:
        points.feature_defaults = {"positive": bool(default_positive)}


def add_box(shapes: Shapes, corner0_world, corner1_world, plane: SlicePlane) -> None:
    """Add a rectangle (in ``plane``) from two opposite world corners."""
    c0, c1 = (np.asarray(shapes.world_to_data(c), dtype=float) for c in (corner0_world, corner1_world))
    shapes.add_rectangles(rectangle_corners(c0, c1, plane)[None])


def refill_layer_combos(viewer, image_combo, labels_combo, new_labels_text: str) -> None:
    """Fill two QComboBoxes with the viewer's Image and Labels layers (never our preview),
    the labels one led by a "new layer" entry (data None); keeps the current choices."""
    from napari.layers import Image, Labels

    for combo, kind, extra in ((image_combo, Image, None), (labels_combo, Labels, new_labels_text)):
        current = combo.currentData()
        combo.clear()
        if extra:
            combo.addItem(extra, None)
        for layer in viewer.layers:
            if isinstance(layer, kind) and not has_role(layer, PREVIEW_ROLE):
                combo.addItem(layer.name, layer)
        index = combo.findData(current) if current is not None else -1
        combo.setCurrentIndex(max(index, 0))


def preferred_image(viewer):
    """The image layer a user most likely means: the selected one, else the topmost
    visible one (the one on display), else the topmost; None without images."""
    from napari.layers import Image

    active = viewer.layers.selection.active
    if isinstance(active, Image):
        return active
    images = [la for la in viewer.layers if isinstance(la, Image)]
    visible = [la for la in images if la.visible]
    return (visible or images or [None])[-1]
