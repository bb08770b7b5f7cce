"""Prompts of one plane -> SAM objects (one batched decode), and their candidate masks.

Prompt rules: points only -> one object; one box (+ points) -> one object; K boxes -> K
objects decoded as one batch, each with the points that lie inside its box (padding
points have label -1). An existing object being refined enters as SAM's mask input.

Masks are upsampled lazily, one candidate at a time, from the low-res logits: the
preview needs only the shown candidate, and that keeps click -> preview latency low.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import mask_to_logits
from .geometry import SlicePlane, rc_to_xy


@dataclass
class Prediction:
    """The decoded objects of one plane.

    Attributes:
        plane: where they are.
        iou: (K, C) predicted IoU of the C candidates of each of the K objects.
        order: (K, C) candidate indices per object, best predicted IoU first.
        low_res: (K, C, h, w) torch logits, or None for masks that were given.
        model: the model that decoded them (for ``postprocess_masks``).
        input_size: (h, w) of the resized image inside the model input.
    """

    plane: SlicePlane
    iou: np.ndarray
    order: np.ndarray
    low_res: torch.Tensor | None = None
    model: object = None
    input_size: tuple[int, int] = (0, 0)
    _masks: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_masks(cls, plane: SlicePlane, masks_hw: np.ndarray) -> "Prediction":
        """A prediction holding given (K, H, W) bool masks (one candidate each)."""
        k = len(masks_hw)
        return cls(plane, np.ones((k, 1)), np.zeros((k, 1), dtype=int), _masks={0: np.asarray(masks_hw, bool)})

    @property
    def num_candidates(self) -> int:
        return self.iou.shape[1]

    def masks(self, rank: int = 0) -> np.ndarray:
        """(K, H, W) bool masks of the ``rank``-th best candidate of every object."""
        rank %= self.num_candidates
        if rank not in self._masks:
            chosen = torch.as_tensor(self.order[:, rank])
            low = self.low_res[torch.arange(len(chosen)), chosen][:, None]  # (K, 1, h, w)
            with torch.inference_mode():
                up = self.model.postprocess_masks(low, self.input_size, self.plane.shape_hw)
            self._masks[rank] = (up[:, 0] > self.model.mask_threshold).cpu().numpy()
        return self._masks[rank]

    def chosen_iou(self, rank: int = 0) -> np.ndarray:
        """(K,) predicted IoU of the chosen candidates."""
        rank %= self.num_candidates
        return self.iou[np.arange(len(self.iou)), self.order[:, rank]]


def group_points(points_xy: np.ndarray, boxes_xyxy: np.ndarray) -> list[np.ndarray]:
    """Indices of the points each object gets: all for <= 1 box, else those inside each box."""
    if len(boxes_xyxy) <= 1:
        return [np.arange(len(points_xy))]
    x, y = points_xy[:, 0], points_xy[:, 1]
    return [np.nonzero((x >= b[0]) & (x <= b[2]) & (y >= b[1]) & (y <= b[3]))[0] for b in boxes_xyxy]


def decode_objects(
    predictor,
    plane: SlicePlane,
    points_rc: np.ndarray,
    point_labels: np.ndarray,
    boxes_xyxy: np.ndarray,
    refine_mask_hw: np.ndarray | None = None,
    multimask="auto",
) -> Prediction:
    """Decode the prompts of ``plane`` against the predictor's current embedding.

    Args:
        predictor: a :class:`~napari_sam.engine.SamPredictor` with the plane's embedding set.
        points_rc: (N, 2) float (row, col) pixels; point_labels (N,) int, 1 / 0.
        boxes_xyxy: (K, 4) float (x0, y0, x1, y1) pixels.
        refine_mask_hw: (H, W) bool existing object, used as mask input (one object only).
        multimask: "auto" (3 candidates for a lone point, else 1), True or False.
    """
    size = predictor.original_size
    points_xy = rc_to_xy(points_rc)
    n_obj = max(1, len(boxes_xyxy))
    coords = labels = boxes = mask_input = None
    if len(points_xy):
        groups = group_points(points_xy, boxes_xyxy)
        n = max(1, max(len(g) for g in groups))
        coords_xy = np.zeros((n_obj, n, 2))
        padded = -np.ones((n_obj, n), dtype=int)  # -1 = padding point
        for k, g in enumerate(groups):
            coords_xy[k, : len(g)], padded[k, : len(g)] = points_xy[g], point_labels[g]
        coords = torch.as_tensor(predictor.transform.apply_coords(coords_xy, size), dtype=torch.float)
        labels = torch.as_tensor(padded, dtype=torch.int)
    if len(boxes_xyxy):
        boxes = torch.as_tensor(predictor.transform.apply_boxes(boxes_xyxy, size), dtype=torch.float)
    if refine_mask_hw is not None and n_obj == 1:
        logits = mask_to_logits(refine_mask_hw, predictor)  # (1, h, w), as propagation makes them
        mask_input = torch.as_tensor(logits)[None]  # (1, 1, h, w)
    if multimask == "auto":
        multimask = len(points_xy) == 1 and len(boxes_xyxy) == 0 and mask_input is None
    device = predictor.device

    def to(t):
        return None if t is None else t.to(device)

    low_res, iou = predictor.decode_low_res(to(coords), to(labels), to(boxes), to(mask_input), bool(multimask))
    iou = iou.float().cpu().numpy()
    return Prediction(plane, iou, np.argsort(-iou, axis=1, kind="stable"), low_res,
                      predictor.model, predictor.input_size)
