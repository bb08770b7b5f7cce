"""Adding prompts from Python (scripts, notebooks, tests) in world coordinates."""

from __future__ import annotations

import numpy as np

from .geometry import SlicePlane, spatial_shape
from .labels_io import label_mask_on_plane
from .prompt_layers import add_box, add_point


def world_position(dims, position) -> np.ndarray:
    """(world ndim,) position as given, or a (row, col) on the displayed axes completed
    with the slider position of the other axes (``dims`` is ``viewer.dims``).

    Raises:
        ValueError: not numbers, not finite, or the wrong length.
    """
    try:
        position = np.asarray(position, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"expected a position of numbers, got {position!r}") from exc
    point = np.asarray(dims.point, dtype=float)
    if not np.isfinite(position).all():
        raise ValueError(f"expected a finite position, got {tuple(position.tolist())}")
    if len(position) == 2 and len(point) > 2:
        point[list(dims.displayed)] = position
        return point
    if len(position) not in (2, len(point)):
        raise ValueError(f"expected a (row, col) or a {len(point)}-D world position, got {len(position)} values")
    return position


def add_point_prompt(dims, image, points_layer, position, positive: bool, default_positive: bool) -> str | None:
    """Add a point to ``points_layer`` at ``position`` (see :func:`world_position`).
    Returns None when added, else why not (for the status line)."""
    try:
        world = world_position(dims, position)
    except ValueError as exc:
        return f"point not added: {exc}"
    data = np.asarray(image.world_to_data(world), dtype=float)
    if np.any(data < -0.5) or np.any(data >= np.asarray(spatial_shape(image)) - 0.5):
        return f"point {tuple(np.round(world, 2).tolist())} is outside the image: ignored"
    add_point(points_layer, world, positive, default_positive)
    return None


def add_box_prompt(dims, boxes_layer, corner0, corner1, plane: SlicePlane) -> str | None:
    """Add a box from two opposite corners (world coordinates, see :func:`world_position`).
    Returns None when added, else why not."""
    try:
        a, b = world_position(dims, corner0), world_position(dims, corner1)
    except ValueError as exc:
        return f"box not added: {exc}"
    add_box(boxes_layer, a, b, plane)
    return None


class PromptsFromPython:
    """Mixin of :class:`~napari_sam._napari.segmenter.InteractiveSegmenter`: prompts and
    refinement started from Python (scripts, notebooks, the widget's buttons) in world
    coordinates."""

    def refine_label(self, label_id: int) -> bool:
        """Start refining object ``label_id`` of the target labels on the shown slice: it is
        used as SAM's mask input for the next prompts, and commit replaces it."""
        if self.labels_layer is None or self.plane is None or self.image_layer is None:
            self.report("choose an image and a target labels layer first")
            return False
        mask = label_mask_on_plane(self.labels_layer, self.source, self.plane, int(label_id),
                                   self.viewer.dims.point)
        if not mask.any():
            self.report(f"label {label_id} is not on this slice")
            return False
        self.refine_id, self._refine_mask = int(label_id), mask
        self.report(f"refining label {label_id}: add points, then commit")
        self.update_preview()
        return True

    def pick_label_at(self, position_world) -> bool:
        """Refine the object of the target labels under ``position_world`` (world coords)."""
        if self.labels_layer is None:
            self.report("choose a target labels layer first")
            return False
        try:
            world = world_position(self.viewer.dims, position_world)
        except ValueError as exc:
            self.report(str(exc))
            return False
        value = self.labels_layer.get_value(world, world=True)
        if not value:
            self.report("no label there to refine")
            return False
        return self.refine_label(int(value))

    def add_point(self, position_world, positive: bool | None = None) -> bool:
        """Add a prompt point (world coordinates; a (row, col) means the shown slice); a
        point outside the image or not finite is refused with a status message."""
        if self.image_layer is None:
            self.report("choose an image layer first")
            return False
        self._ensure_prompt_layers()
        why = add_point_prompt(self.viewer.dims, self.source, self.points_layer, position_world,
                               self.positive if positive is None else positive, self.positive)
        if why is not None:
            self.report(why)
        return why is None

    def add_box(self, corner0_world, corner1_world) -> bool:
        """Add a box prompt from two opposite corners (world coordinates)."""
        if self.image_layer is None or self.plane is None:
            self.report("choose an image layer and a 2D view first")
            return False
        self._ensure_prompt_layers()
        why = add_box_prompt(self.viewer.dims, self.boxes_layer, corner0_world, corner1_world, self.plane)
        if why is not None:
            self.report(why)
        return why is None
