"""Prompts of one plane -> SAM objects (one batched decode), and their candidate masks.

Prompt rules: points only -> one object; one box (+ points) -> one object; K boxes -> K
objects decoded as one batch, each with the points that lie inside its box (padding
points have label -1). An existing object being refined enters as SAM's mask input.

Masks are upsampled lazily, one candidate at a time, from the low-res logits: the
preview needs only the shown candidate, and that keeps click -> preview latency low.

Tiled planes (:func:`decode_on_tiles`): each object is decoded on the tile that owns its
prompt (:meth:`~napari_sam.engine.tiled_predictor.TiledPredictor.choose_tile`); its masks
stay tile-sized with the tile's offset (``Prediction.offsets_rc``), and the preview and the
commit use only the region the objects cover (:meth:`Prediction.ids`) — no whole-plane
array per click.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import full_res_masks, mask_to_logits
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
        offsets_rc: (K, 2) int (row, col) of each object's frame in the plane; None: every
            frame is the whole plane (untiled).
        frame_hw: (h, w) of the frames (a tile's size); None: the plane's.
    """

    plane: SlicePlane
    iou: np.ndarray
    order: np.ndarray
    low_res: torch.Tensor | None = None
    model: object = None
    input_size: tuple[int, int] = (0, 0)
    offsets_rc: np.ndarray | None = None
    frame_hw: tuple[int, int] | None = None
    _masks: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_masks(cls, plane: SlicePlane, masks_hw: np.ndarray, crop: bool = False) -> Prediction:
        """A prediction holding given (K, H, W) bool masks (one candidate each); ``crop``:
        kept as the region they cover only (tiled planes)."""
        k = len(masks_hw)
        masks_hw = np.asarray(masks_hw, bool)
        offsets = frame = None
        box = _bbox(masks_hw.any(axis=0), (0, 0)) if crop else None
        if box is not None:
            masks_hw = masks_hw[:, box[0] : box[1], box[2] : box[3]]
            offsets, frame = np.tile([box[0], box[2]], (k, 1)), masks_hw.shape[1:]
        return cls(plane, np.ones((k, 1)), np.zeros((k, 1), dtype=int), offsets_rc=offsets, frame_hw=frame,
                   _masks={0: masks_hw})

    @property
    def num_candidates(self) -> int:
        return self.iou.shape[1]

    @property
    def tiled(self) -> bool:
        return self.offsets_rc is not None

    def crops(self, rank: int = 0) -> np.ndarray:
        """(K, h, w) bool masks of the ``rank``-th best candidate of every object, each in
        its own frame (``offsets_rc``, ``frame_hw``; the whole plane when untiled)."""
        rank %= self.num_candidates
        if rank not in self._masks:
            chosen = torch.as_tensor(self.order[:, rank])
            low = self.low_res[torch.arange(len(chosen)), chosen][:, None]  # (K, 1, h, w)
            size = self.frame_hw or self.plane.shape_hw
            with torch.inference_mode():
                # only the blocks near the mask's edge are interpolated (where the model can)
                (up,) = full_res_masks(self.model, low, self.input_size, size)
            self._masks[rank] = up[:, 0].cpu().numpy()
        return self._masks[rank]

    def masks(self, rank: int = 0) -> np.ndarray:
        """(K, H, W) bool masks of the ``rank``-th best candidate of every object on the
        whole plane (a plane-sized array per object: on large tiled planes prefer
        :meth:`ids` or :meth:`crops`)."""
        crops = self.crops(rank)
        if not self.tiled:
            return crops
        out = np.zeros((len(crops), *self.plane.shape_hw), dtype=bool)
        h, w = crops.shape[1:]
        for k, (r, c) in enumerate(self.offsets_rc):
            out[k, r : r + h, c : c + w] = crops[k]
        return out

    def pixels(self, rank: int = 0) -> np.ndarray:
        """(K,) pixels of each object's mask."""
        crops = self.crops(rank)
        return np.array([np.count_nonzero(c) for c in crops], dtype=np.int64)  # no int copy of the masks

    def ids(self, rank: int = 0, last_wins: bool = False,
            crop: bool = False) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The objects as (h, w) int32 ids 1..K (0 = none) over their region, and the
        region's (row, col) offset in the plane; None when every mask is empty. The region:
        the whole plane (untiled; ``crop``: the masks' bounding box); the frames (tiles) of
        the non-empty objects, or only their masks' bounding box when those frames lie far
        apart (tiled). Where objects overlap, the first wins (``last_wins``: the last, a
        later prompt painting over)."""
        crops = self.crops(rank)
        offsets = np.zeros((len(crops), 2), int) if not self.tiled else np.asarray(self.offsets_rc, int)
        boxes = [_bbox(m, o) for m, o in zip(crops, offsets)]
        if all(b is None for b in boxes):
            return None
        if self.tiled:
            fh, fw = crops.shape[1:]
            frames = [(r, r + fh, c, c + fw) for (r, c), b in zip(offsets, boxes) if b is not None]
            r0, r1 = min(f[0] for f in frames), max(f[1] for f in frames)
            c0, c1 = min(f[2] for f in frames), max(f[3] for f in frames)
            if (r1 - r0) * (c1 - c0) > 4 * fh * fw:  # frames far apart: the masks' region only
                r0, r1 = min(b[0] for b in boxes if b), max(b[1] for b in boxes if b)
                c0, c1 = min(b[2] for b in boxes if b), max(b[3] for b in boxes if b)
        elif crop:  # e.g. the preview: no plane-sized array per click
            r0, r1 = min(b[0] for b in boxes if b), max(b[1] for b in boxes if b)
            c0, c1 = min(b[2] for b in boxes if b), max(b[3] for b in boxes if b)
        else:
            (r0, c0), (r1, c1) = (0, 0), self.plane.shape_hw
        ids = np.zeros((r1 - r0, c1 - c0), dtype=np.int32)
        order = range(len(crops)) if last_wins else range(len(crops) - 1, -1, -1)
        painted = False
        for k in order:
            if boxes[k] is None:
                continue
            br0, br1, bc0, bc1 = boxes[k]
            o_r, o_c = offsets[k]
            inside = crops[k][br0 - o_r : br1 - o_r, bc0 - o_c : bc1 - o_c]
            region = ids[br0 - r0 : br1 - r0, bc0 - c0 : bc1 - c0]
            # whole-array operations: boolean-index assignment is several times slower
            if painted:  # keep the other objects' pixels outside this mask
                region[...] = np.where(inside, np.int32(k + 1), region)
            else:  # still all zero
                np.multiply(inside, np.int32(k + 1), out=region)
            painted = True
        return ids, (int(r0), int(c0))

    def chosen_iou(self, rank: int = 0) -> np.ndarray:
        """(K,) predicted IoU of the chosen candidates."""
        rank %= self.num_candidates
        return self.iou[np.arange(len(self.iou)), self.order[:, rank]]


def _bbox(mask_hw: np.ndarray, offset_rc) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) half-open box of a mask's pixels in plane coordinates, or None."""
    rows, cols = np.flatnonzero(mask_hw.any(axis=1)), np.flatnonzero(mask_hw.any(axis=0))
    if rows.size == 0:
        return None
    o_r, o_c = (int(v) for v in offset_rc)
    return o_r + int(rows[0]), o_r + int(rows[-1]) + 1, o_c + int(cols[0]), o_c + int(cols[-1]) + 1


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


def decode_on_tiles(
    tiled,
    plane: SlicePlane,
    points_rc: np.ndarray,
    point_labels: np.ndarray,
    boxes_xyxy: np.ndarray,
    refine_mask_hw: np.ndarray | None = None,
    multimask="auto",
) -> Prediction:
    """Decode the prompts of a tiled ``plane``: each object on the tile that owns its
    prompt, objects sharing a tile in one batch (same prompt rules as :func:`decode_objects`).

    Args:
        tiled: a :class:`~napari_sam.engine.tiled_predictor.TiledPredictor` whose tiles
            (``set_tiles``) are those of ``plane``; every tile asked for must be available.
        points_rc, point_labels, boxes_xyxy, refine_mask_hw, multimask: as
            :func:`decode_objects`, in plane pixels ((H, W) for the refine mask).
    Returns: a tiled :class:`Prediction` (tile-sized masks with offsets).
    """
    objects = object_prompts(points_rc, point_labels, boxes_xyxy)
    tiles = [object_tile(tiled.grid, plane, points_rc[g], point_labels[g], box, refine_mask_hw)
             for g, box in objects]
    if multimask == "auto":
        multimask = len(points_rc) == 1 and len(boxes_xyxy) == 0 and refine_mask_hw is None
    k_all = len(objects)
    parts: dict[int, tuple] = {}
    for index in dict.fromkeys(t.index for t in tiles):  # tiles in first-use order
        tile = tiled.grid.tiles[index]
        members = [k for k in range(k_all) if tiles[k].index == index]
        r0, r1, c0, c1 = tile.outer_rc
        picked = np.unique(np.concatenate([objects[k][0] for k in members])).astype(int)
        rc = points_rc[picked] - (r0, c0)
        inside = (rc[:, 0] >= -0.5) & (rc[:, 0] < r1 - r0 - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] < c1 - c0 - 0.5)
        boxes = np.array([objects[k][1] for k in members if objects[k][1] is not None], float).reshape(-1, 4)
        if len(boxes):
            boxes = np.clip(boxes - (c0, r0, c0, r0), 0, np.array([c1 - c0, r1 - r0] * 2) - 1)
        refine = None
        if refine_mask_hw is not None and k_all == 1:
            refine = refine_mask_hw[r0:r1, c0:c1]
        tile_plane = SlicePlane((0, 1), (-1, -1), tile.shape_hw)
        part = decode_objects(tiled.use_tile(tile), tile_plane, rc[inside], point_labels[picked][inside],
                              boxes, refine, bool(multimask))
        parts[index] = (members, part)
    first = next(iter(parts.values()))[1]
    iou = np.zeros((k_all, first.num_candidates), np.float32)
    low = torch.zeros((k_all, *first.low_res.shape[1:]), dtype=first.low_res.dtype, device=first.low_res.device)
    offsets = np.zeros((k_all, 2), int)
    for index, (members, part) in parts.items():
        iou[members], low[members] = part.iou, part.low_res
        offsets[members] = tiled.grid.tiles[index].offset_rc
    return Prediction(plane, iou, np.argsort(-iou, axis=1, kind="stable"), low, first.model, first.input_size,
                      offsets, tuple(tiled.grid.tile_hw))


def object_prompts(points_rc: np.ndarray, point_labels: np.ndarray, boxes_xyxy: np.ndarray) -> list[tuple]:
    """The objects of a plane's prompts: [(point indices, box_xyxy or None), …] — one
    object for points and <= 1 box, else one per box with the points inside it."""
    groups = group_points(rc_to_xy(points_rc), boxes_xyxy)
    boxes = list(np.asarray(boxes_xyxy, float).reshape(-1, 4)) or [None]
    return list(zip(groups, boxes))


def object_tile(grid, plane: SlicePlane, points_rc, point_labels, box_xyxy, refine_mask_hw=None):
    """The tile an object is decoded on: its box's
    (:meth:`~napari_sam.engine.tiling.TileGrid.tile_for_box`), else its positive points'
    (all points when none is positive), else the bounding box of the refined mask."""
    points_xy = rc_to_xy(points_rc)
    counted = points_xy[np.asarray(point_labels) == 1] if (np.asarray(point_labels) == 1).any() else points_xy
    if box_xyxy is None and len(counted) == 0 and refine_mask_hw is not None:
        box = _bbox(refine_mask_hw, (0, 0))
        if box is not None:
            box_xyxy = np.array([box[2], box[0], box[3] - 1, box[1] - 1], float)
    if box_xyxy is not None:  # as TiledPredictor.choose_tile
        return grid.tile_for_box(box_xyxy)
    if len(counted) == 0:
        raise ValueError("expected a point, a box or a mask to decode on a tiled plane, got none")
    return grid.tile_for_points(counted)
