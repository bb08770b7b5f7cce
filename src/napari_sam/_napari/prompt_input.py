"""Adding prompts from Python (scripts, notebooks, tests) in world coordinates."""

from __future__ import annotations

import numpy as np

from .geometry import SlicePlane, spatial_shape
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
