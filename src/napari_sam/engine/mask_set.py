"""The masks found by automatic mask generation, stored compactly, and their outputs.

A :class:`MaskSet` keeps every mask as the bit-packed content of its bounding box
(:class:`CompactMask`): a few bytes for a small object, at most H*W/8 bytes for a mask as
large as the image. Full-resolution arrays are made only on request, one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from skimage.measure import label as connected_components

from .amg_utils import batched_mask_to_box, nms

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass(frozen=True)
class CompactMask:
    """A binary mask stored as the packed bits of its bounding box.

    Attributes:
        box: (x0, y0, x1, y1) inclusive, in image pixels.
        bits: ``np.packbits`` of the (y1 - y0 + 1, x1 - x0 + 1) bool content of the box.
        area: number of True pixels.
    """

    box: tuple[int, int, int, int]
    bits: np.ndarray
    area: int

    @classmethod
    def from_array(cls, mask: np.ndarray, box_xyxy=None, offset_xy=(0, 0)) -> "CompactMask":
        """``mask``: (H, W) bool with its inclusive ``box_xyxy`` (computed when None);
        ``offset_xy`` moves the stored box (e.g. from crop to image coordinates)."""
        if box_xyxy is None:
            box_xyxy = batched_mask_to_box(torch.from_numpy(mask)).tolist()
        x0, y0, x1, y1 = (int(v) for v in box_xyxy)
        sub = np.ascontiguousarray(mask[y0 : y1 + 1, x0 : x1 + 1])
        dx, dy = (int(v) for v in offset_xy)
        return cls((x0 + dx, y0 + dy, x1 + dx, y1 + dy), np.packbits(sub), int(sub.sum()))

    @property
    def shape(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0 + 1, x1 - x0 + 1

    def crop(self) -> np.ndarray:
        """(h, w) bool content of the box."""
        h, w = self.shape
        return np.unpackbits(self.bits, count=h * w).reshape(h, w).astype(bool)

    def full(self, image_size: tuple[int, int]) -> np.ndarray:
        """(H, W) bool mask."""
        out = np.zeros(image_size, dtype=bool)
        x0, y0, x1, y1 = self.box
        out[y0 : y1 + 1, x0 : x1 + 1] = self.crop()
        return out


@dataclass
class MaskSet:
    """N masks of one (H, W) image with the reference's per-mask data.

    Attributes:
        image_size: (H, W).
        masks: N :class:`CompactMask`.
        boxes: (N, 4) int64 xyxy inclusive, image pixels.
        predicted_iou, stability_score: (N,) float32.
        points: (N, 2) float64 (x, y) image pixels of the prompt that made each mask.
        crop_boxes: (N, 4) int64 xyxy (exclusive end) of the crop each mask came from.
    """

    image_size: tuple[int, int]
    masks: list[CompactMask] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    predicted_iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stability_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))
    crop_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    _ARRAYS = ("boxes", "predicted_iou", "stability_score", "points", "crop_boxes")

    def __len__(self) -> int:
        return len(self.masks)

    def filter(self, index) -> "MaskSet":
        """A new set with the masks at ``index`` (int array or bool mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        arrays = {k: getattr(self, k)[index] for k in self._ARRAYS}
        return MaskSet(self.image_size, [self.masks[i] for i in index], **arrays)

    @classmethod
    def concat(cls, image_size: tuple[int, int], sets: list["MaskSet"]) -> "MaskSet":
        if not sets:
            return cls(image_size)
        arrays = {k: np.concatenate([getattr(s, k) for s in sets]) for k in cls._ARRAYS}
        return cls(image_size, [m for s in sets for m in s.masks], **arrays)

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 pixel counts."""
        return np.array([m.area for m in self.masks], dtype=np.int64)

    def mask(self, i: int) -> np.ndarray:
        """(H, W) bool mask ``i``."""
        return self.masks[i].full(self.image_size)

    def to_records(self, output_mode: str = "binary_mask") -> list[dict]:
        """The reference ``SamAutomaticMaskGenerator.generate`` records, one dict per mask:
        segmentation, area, bbox (xywh), predicted_iou, point_coords, stability_score,
        crop_box (xywh)."""
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"expected output_mode in {OUTPUT_MODES}, got {output_mode!r}")
        records = []
        for i, compact in enumerate(self.masks):
            full = compact.full(self.image_size)
            if output_mode == "binary_mask":
                segmentation = full
            else:
                segmentation = mask_to_rle(full)
                if output_mode == "coco_rle":
                    segmentation = coco_encode_rle(segmentation)
            records.append(
                {
                    "segmentation": segmentation,
                    "area": compact.area,
                    "bbox": _xyxy_to_xywh(self.boxes[i]),
                    "predicted_iou": float(self.predicted_iou[i]),
                    "point_coords": [self.points[i].tolist()],
                    "stability_score": float(self.stability_score[i]),
                    "crop_box": _xyxy_to_xywh(self.crop_boxes[i]),
                }
            )
        return records


def _xyxy_to_xywh(box) -> list[int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


# ---------------------------------------------------------------------- run-length encodings
def mask_to_rle(mask: np.ndarray) -> dict:
    """(H, W) bool -> uncompressed COCO RLE ``{"size": [H, W], "counts": [...]}`` (column-major
    runs, starting with a run of zeros)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.ravel()  # Fortran order
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [h * w]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    return np.repeat(values, rle["counts"]).reshape(w, h).T


def area_from_rle(rle: dict) -> int:
    return int(sum(rle["counts"][1::2]))


def require_pycocotools():
    """The ``pycocotools.mask`` module, or an ImportError saying how to get it."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError(
            "output_mode='coco_rle' needs pycocotools (pip install pycocotools); "
            "'binary_mask' and 'uncompressed_rle' work without it"
        ) from None
    return mask_utils


def coco_encode_rle(uncompressed_rle: dict) -> dict:
    """Uncompressed RLE -> compressed COCO RLE with a str ``counts`` (JSON-friendly)."""
    mask_utils = require_pycocotools()
    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# ---------------------------------------------------------------------- small-region clean-up
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than ``area_thresh`` pixels
    (8-connectivity, as the reference's OpenCV version). An island mask whose regions are
    all small keeps its largest one. Returns (mask, changed)."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"expected mode 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    regions = connected_components(holes ^ mask, connectivity=2)
    sizes = np.bincount(regions.ravel())[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(regions, small), True
    keep = np.setdiff1d(np.arange(1, sizes.size + 1), small)
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, keep), True


def _clean_mask(compact: CompactMask, image_size, min_area: int) -> tuple[np.ndarray, tuple, bool]:
    """Clean one mask; returns (mask content, its window (y0, x0) in the image, changed).

    Works on the bounding box plus a 1-pixel border where the box does not touch the image
    edge: a background region touching that border belongs to the region outside the box.
    That is exact when the outside region is connected and not smaller than ``min_area``;
    otherwise the whole image is used.
    """
    h, w = image_size
    x0, y0, x1, y1 = compact.box
    outside = h * w - (x1 - x0 + 1) * (y1 - y0 + 1)
    connected_outside = not (x0 == 0 and x1 == w - 1) and not (y0 == 0 and y1 == h - 1)
    if not (connected_outside and outside >= min_area):
        mask = compact.full(image_size)
        mask, changed_h = remove_small_regions(mask, min_area, "holes")
        mask, changed_i = remove_small_regions(mask, min_area, "islands")
        return mask, (0, 0), changed_h or changed_i
    pad = ((int(y0 > 0), int(y1 < h - 1)), (int(x0 > 0), int(x1 < w - 1)))
    sub = np.pad(compact.crop(), pad)
    background = connected_components(~sub, connectivity=2)
    border = np.zeros_like(sub)
    border[: pad[0][0]], border[sub.shape[0] - pad[0][1] :] = True, True
    border[:, : pad[1][0]], border[:, sub.shape[1] - pad[1][1] :] = True, True
    sizes = np.bincount(background.ravel())
    sizes[np.unique(background[border])] = np.iinfo(np.int64).max  # the outside: large
    small = np.flatnonzero(sizes[1:] < min_area) + 1
    changed_h = small.size > 0
    if changed_h:
        sub = sub | np.isin(background, small)
    sub = sub[pad[0][0] : sub.shape[0] - pad[0][1], pad[1][0] : sub.shape[1] - pad[1][1]]
    sub, changed_i = remove_small_regions(sub, min_area, "islands")
    return sub, (y0, x0), changed_h or changed_i


def postprocess_small_regions(masks: MaskSet, min_area: int, nms_thresh: float, stop=None) -> MaskSet:
    """The reference's clean-up: fill small holes, drop small islands, then box NMS
    preferring unchanged masks (changed ones get score 0). ``stop``: called before each
    mask (a cancelled job's check raises there)."""
    if len(masks) == 0:
        return masks
    new_masks, new_boxes, changed = [], [], []
    for compact in masks.masks:
        if stop is not None:
            stop()
        content, (oy, ox), was_changed = _clean_mask(compact, masks.image_size, min_area)
        cleaned = CompactMask.from_array(content, offset_xy=(ox, oy)) if was_changed else compact
        new_masks.append(cleaned)
        new_boxes.append(cleaned.box if cleaned.area else (0, 0, 0, 0))
        changed.append(was_changed)
    new_boxes = np.array(new_boxes, dtype=np.int64).reshape(-1, 4)
    changed = np.array(changed)
    scores = torch.from_numpy((~changed).astype(np.float32))
    keep = nms(torch.from_numpy(new_boxes).float(), scores, nms_thresh).numpy()
    out = masks.filter(keep)
    out.masks = [new_masks[i] for i in keep]
    # like the reference, only changed masks get their recomputed box
    out.boxes = np.where(changed[keep, None], new_boxes[keep], out.boxes)
    return out
