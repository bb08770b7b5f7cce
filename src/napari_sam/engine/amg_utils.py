"""Building blocks of automatic mask generation: point grids, crops, boxes, NMS, stability.

Same definitions as ``segment_anything.utils.amg`` (so the generator returns the reference's
masks), written as vectorised torch/numpy without torchvision or OpenCV. Boxes are
``xyxy`` with inclusive pixel coordinates, as the reference computes them from masks.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------- point grids, crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) float64 (x, y) in [0, 1]: cell centres of an n x n grid, rows of x first."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``int(n_per_side / scale_per_layer**i)`` per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes ``[x0, y0, x1, y1]`` (exclusive ends) and their layer index.

    Layer 0 is the whole image; layer i >= 1 has (2**i)² overlapping crops.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w = crop_len(im_w, n_per_side, overlap)
        crop_h = crop_len(im_h, n_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_per_side)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


# ---------------------------------------------------------------------- boxes and NMS
def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(N, 4) -> (N,) ``(x1 - x0) * (y1 - y0)`` (torchvision's definition)."""
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])


def box_iou(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) float -> (N, M) IoU; NaN where both boxes have zero area."""
    lt = torch.maximum(a_xyxy[:, None, :2], b_xyxy[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a_xyxy[:, None, 2:], b_xyxy[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a_xyxy)[:, None] + box_area(b_xyxy)[None, :] - inter)


def nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou_threshold: float, block: int = 512) -> torch.Tensor:
    """Greedy non-maximum suppression, the rule of ``torchvision.ops.nms``.

    Boxes are visited by decreasing score (stable for ties); a box is dropped when its IoU
    with an already kept box is strictly greater than ``iou_threshold``. IoUs are computed
    as (block, N) matrices, so memory stays O(block * N).

    Args:
        boxes_xyxy: (N, 4) float. scores: (N,) float.
    Returns:
        (K,) int64 indices of the kept boxes, highest score first.
    """
    n = boxes_xyxy.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes_xyxy[order].float()
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        over = (box_iou(boxes[start:stop], boxes[start:]) > iou_threshold).numpy()  # (b, n - start)
        for i in range(start, stop):
            if not suppressed[i]:
                keep.append(i)
                suppressed[start:] |= over[i - start]
    return order[torch.as_tensor(keep, dtype=torch.int64)]


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., 4) int64 xyxy inclusive; [0, 0, 0, 0] for an empty mask."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1).to(torch.uint8)  # (..., H)
    cols = masks.any(dim=-2).to(torch.uint8)  # (..., W)
    top = rows.argmax(dim=-1)
    bottom = h - 1 - rows.flip(-1).argmax(dim=-1)
    left = cols.argmax(dim=-1)
    right = w - 1 - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(dim=-1, keepdim=True)


def is_box_near_crop_edge(
    boxes_xyxy: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """(N, 4) boxes in crop coordinates -> (N,) bool: near a crop edge that is not an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float)
    orig = torch.as_tensor(orig_box, dtype=torch.float)
    boxes = (boxes_xyxy + torch.as_tensor(crop_box[:2] * 2)).float()
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


# ---------------------------------------------------------------------- stability score
def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """(..., H, W) logits -> (...,) IoU of the masks thresholded at ``t + offset`` and
    ``t - offset`` (the first lies inside the second); NaN for two empty masks."""
    inter = (logits > mask_threshold + offset).sum(-1, dtype=torch.int32).sum(-1)
    union = (logits > mask_threshold - offset).sum(-1, dtype=torch.int32).sum(-1)
    return stability_from_counts(inter, union)


def stability_from_counts(inside: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """(...,) int32 pixel counts above ``t + offset`` and above ``t - offset`` -> (...,)
    float32 stability score (their ratio; NaN for two empty masks)."""
    return inside.to(torch.int32) / band.to(torch.int32)


class StabilityBound:
    """An upper bound on the full-resolution stability score, from low-res logits.

    The full-resolution logits are bilinear interpolations (up to S x S, crop to the resized
    input, then to the original size), so each pixel is a convex combination of the low-res
    pixels of a small window: it can be above a threshold only where the window maximum is,
    and lies surely between two thresholds where the whole window does. Counting
    full-resolution pixels per window bounds the score (see :meth:`upper`) without
    upsampling. Masks whose bound is below the stability threshold are dropped exactly as
    the reference would drop them.

    Args:
        low_res_hw: (h, w) of the low-res logits. image_size: S of the padded model input.
        input_size: (h, w) of the resized image. original_size: (H, W) of the image.
    """

    EPS = 1e-3  # slack for rounding in the interpolation, in logit units

    def __init__(self, low_res_hw, image_size, input_size, original_size) -> None:
        self.row_weight, self.row_width = self._axis(low_res_hw[0], image_size, input_size[0], original_size[0])
        self.col_weight, self.col_width = self._axis(low_res_hw[1], image_size, input_size[1], original_size[1])

    @staticmethod
    def _axis(n_low: int, size: int, n_in: int, n_out: int) -> tuple[torch.Tensor, int]:
        """Along one axis: (n_low,) float32 number of full-res pixels whose window starts at
        each low-res index, and the widest window. Output pixel values depend on low-res pixels
        [start, start + width) only."""

        def interp(n_src: int, n_dst: int) -> torch.Tensor:  # (n_src, n_dst) weights
            eye = torch.eye(n_src, dtype=torch.float64)[None]  # (1, n_src, n_src)
            return F.interpolate(eye, size=n_dst, mode="linear", align_corners=False)[0]

        weights = interp(n_low, size)[:, :n_in]  # (n_low, n_in)
        if n_in != n_out:
            weights = weights @ interp(n_in, n_out)  # (n_low, n_out)
        support = weights > 0
        lo = support.to(torch.uint8).argmax(0)  # (n_out,) first low-res index
        hi = n_low - 1 - support.flip(0).to(torch.uint8).argmax(0)  # last low-res index
        per_start = torch.bincount(lo, minlength=n_low).to(torch.float32)
        return per_start, int((hi - lo).max()) + 1

    @staticmethod
    def _windows(above: torch.Tensor, row_width: int, col_width: int, combine) -> torch.Tensor:
        """(B, h, w) bool -> (B, h, w) bool: ``combine`` (or = any, and = all) over the window
        starting at each pixel (clipped at the far edges, i.e. a superset of the true window)."""
        out = above.clone()
        for dim, width in ((1, row_width), (2, col_width)):
            src = out.clone() if width > 1 else out
            n = out.shape[dim]
            for k in range(1, min(width, n)):
                head, tail = out.narrow(dim, 0, n - k), src.narrow(dim, k, n - k)
                head.copy_(combine(head, tail))
        return out

    def _count(self, inside: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool at window starts -> (B,) float64 number of full-res pixels."""
        col = self.col_weight.to(inside.device)
        row = self.row_weight.to(inside.device)
        return ((inside.float() @ col) @ row).double()  # exact below 2**24 pixels

    def upper(self, logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
        """(B, h, w) low-res logits -> (B,) float64 upper bound of :func:`stability_score`
        of the full-resolution logits (0 where that score is 0 or NaN).

        With I = #(v > t + o) and the band count D = #(t - o < v <= t + o), the score is
        I / (I + D): increasing in I, decreasing in D. So I_max / (I_max + D_min) bounds it.
        """
        lo, hi = mask_threshold - offset + self.EPS, mask_threshold + offset - self.EPS
        widths = self.row_width, self.col_width
        maybe_inside = self._windows(logits > hi, *widths, torch.logical_or)
        surely_band = self._windows((logits > lo) & (logits < hi), *widths, torch.logical_and)
        inter_max, band_min = self._count(maybe_inside), self._count(surely_band)
        return inter_max / (inter_max + band_min).clamp(min=1)
