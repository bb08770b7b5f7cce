"""From overlapping masks to a label image, and one id per object through a stack."""

from __future__ import annotations

import numpy as np

from .mask_set import CompactMask, MaskSet, rle_to_mask


def masks_to_label_image(masks: MaskSet | list[dict], min_size: int = 0) -> np.ndarray:
    """Paint masks into a non-overlapping (H, W) int32 label image, 0 = background.

    Where masks overlap the higher-quality one wins: masks are painted by decreasing
    predicted IoU (then stability score), each only onto pixels still free. Ids are
    1..K in that order. A mask left with fewer than ``max(1, min_size)`` free pixels is
    dropped.

    Args:
        masks: a :class:`~napari_sam.engine.mask_set.MaskSet`, or reference-style records
            (``generate`` output with "binary_mask" or "uncompressed_rle" segmentations).
    """
    if isinstance(masks, MaskSet):
        compact, size = masks.masks, masks.image_size
        quality, stability = masks.predicted_iou, masks.stability_score
    else:
        compact = [_record_to_compact(r) for r in masks]
        if not compact:
            raise ValueError("expected a MaskSet or at least one record (the image size is unknown), got []")
        size = _record_size(masks[0])
        quality = np.array([r["predicted_iou"] for r in masks], dtype=np.float64)
        stability = np.array([r["stability_score"] for r in masks], dtype=np.float64)
    labels = np.zeros(size, dtype=np.int32)
    next_id = 1
    for i in np.lexsort((-np.asarray(stability), -np.asarray(quality))):  # best first
        x0, y0, x1, y1 = compact[i].box
        region = labels[y0 : y1 + 1, x0 : x1 + 1]  # a view
        free = compact[i].crop() & (region == 0)
        if free.sum() >= max(1, min_size):
            region[free] = next_id
            next_id += 1
    return labels


def _record_size(record: dict) -> tuple[int, int]:
    seg = record["segmentation"]
    return tuple(seg["size"]) if isinstance(seg, dict) else seg.shape


def _record_to_compact(record: dict) -> CompactMask:
    seg = record["segmentation"]
    if isinstance(seg, dict):
        if not isinstance(seg.get("counts"), list):
            raise ValueError("expected 'binary_mask' or 'uncompressed_rle' records, got a compressed RLE")
        seg = rle_to_mask(seg)
    return CompactMask.from_array(np.asarray(seg, dtype=bool))


def link_slices(labels: np.ndarray, min_iou: float = 0.25) -> np.ndarray:
    """Give objects of consecutive slices that overlap one shared id.

    Slice by slice, each object is matched to at most one object of the previous slice
    (greedily by decreasing IoU, IoU >= ``min_iou``) and takes its id; unmatched objects get
    new ids. An object therefore keeps one id as long as it is present in consecutive slices.

    Args:
        labels: (N, H, W) int, independent label images of N consecutive slices.
    Returns:
        (N, H, W) int32 with ids 1..K over the whole stack.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected (N, H, W) labels, got shape {labels.shape}")
    if not 0 < min_iou <= 1:
        raise ValueError(f"expected 0 < min_iou <= 1, got {min_iou}")
    out = np.zeros(labels.shape, dtype=np.int32)
    next_id = 1
    for z in range(labels.shape[0]):
        out[z], next_id = link_slice(out[z - 1] if z > 0 else None, labels[z], next_id, min_iou)
    return out


def link_slice(prev: np.ndarray | None, cur: np.ndarray, next_id: int,
               min_iou: float = 0.25) -> tuple[np.ndarray, int]:
    """One step of :func:`link_slices`: slice ``cur`` ((H, W) int, its own ids) relabelled
    against the already linked previous slice ``prev`` ((H, W) int, None for the first);
    unmatched objects get ids from ``next_id`` on. Returns ((H, W) int32, the next free id)
    — so a stack can be linked slice by slice with two slices in memory."""
    cur = np.asarray(cur).astype(np.int64)
    ids = np.unique(cur[cur > 0])
    lut = np.zeros(int(cur.max()) + 1 if cur.size else 1, dtype=np.int32)
    if prev is not None:
        for cur_id, prev_id in _match(np.asarray(prev), cur, min_iou):
            lut[cur_id] = prev_id
    for cur_id in ids:
        if lut[cur_id] == 0:
            lut[cur_id] = next_id
            next_id += 1
    return lut[cur], next_id


def _match(prev: np.ndarray, cur: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one (cur_id, prev_id) pairs with IoU >= min_iou, best IoU first."""
    both = (prev > 0) & (cur > 0)
    if not both.any():
        return []
    stride = int(cur.max()) + 1
    pairs, inter = np.unique(prev[both].astype(np.int64) * stride + cur[both], return_counts=True)
    prev_ids, cur_ids = pairs // stride, pairs % stride
    prev_area = np.bincount(prev.ravel())
    cur_area = np.bincount(cur.ravel())
    iou = inter / (prev_area[prev_ids] + cur_area[cur_ids] - inter)
    matches, used_prev, used_cur = [], set(), set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < min_iou:
            break
        p, c = int(prev_ids[k]), int(cur_ids[k])
        if p not in used_prev and c not in used_cur:
            matches.append((c, p))
            used_prev.add(p)
            used_cur.add(c)
    return matches
