"""Adding prompts from Python (scripts, notebooks, tests) in world coordinates."""

from __future__ import annotations

import numpy as np

from .geometry import spatial_shape
from .prompt_layers import add_box, add_point


class PromptInputMixin:
    """Needs ``viewer``, ``image_layer``, ``plane``, ``positive``, ``points_layer``,
    ``boxes_layer``, ``_ensure_prompt_layers`` and ``_status`` from its class."""

    def world_position(self, position) -> np.ndarray:
        """(world ndim,) position as given, or a (row, col) on the displayed axes completed
        with the slider position of the other axes."""
        position = np.asarray(position, dtype=float)
        point = np.asarray(self.viewer.dims.point, dtype=float)
        if len(position) == 2 and len(point) > 2:
            point[list(self.viewer.dims.displayed)] = position
            return point
        return position

    def add_point(self, position_world, positive: bool | None = None) -> bool:
        """Add a prompt point (world coordinates, see :meth:`world_position`); a point
        outside the image is refused with a status message. True when added."""
        if self.image_layer is None:
            self._status("choose an image layer first")
            return False
        self._ensure_prompt_layers()
        world = self.world_position(position_world)
        data = np.asarray(self.image_layer.world_to_data(world), dtype=float)
        if np.any(data < -0.5) or np.any(data >= np.asarray(spatial_shape(self.image_layer)) - 0.5):
            self._status(f"point {tuple(np.round(world, 2).tolist())} is outside the image: ignored")
            return False
        add_point(self.points_layer, world, self.positive if positive is None else positive, self.positive)
        return True

    def add_box(self, corner0_world, corner1_world) -> bool:
        """Add a box prompt from two opposite corners (world coordinates)."""
        if self.image_layer is None or self.plane is None:
            self._status("choose an image layer and a 2D view first")
            return False
        self._ensure_prompt_layers()
        add_box(self.boxes_layer, self.world_position(corner0_world), self.world_position(corner1_world), self.plane)
        return True
