"""Automatic prompt generation (APG): micro-sam's instance segmentation from decoder prompts.

micro-sam (>= 1.7, ``AutomaticPromptGenerator.generate``) turns the outputs of its instance
decoder into point prompts (one per seed component, where the seed is farthest from its
outline), decodes them with SAM, optionally again with boxes around the masks, and merges
the masks by non-maximum suppression into one label image. We return the same label image
with our predictor; masks are kept as bit-packed crops (no dense (N, H, W) stacks) and NMS
works on crop overlaps. micro-sam's behaviour, quirks included:

* seeds: ``seed_markers(..., connectivity=1, foreground_inclusive=True)``; components are
  numbered as its block-wise labelling numbers them (512 x 512 blocks, merged across block
  faces by a union-find), which is row-major order for images up to 512 x 512;
* centre of a seed: maximum of the Euclidean distance to the nearest pixel that is the
  seed's outer outline (``skimage.segmentation.find_boundaries(mode="outer")``) or on the
  image border, computed block-wise (512 blocks, halo 16) as micro-sam does; ties go to the
  first pixel in row-major order; a seed with all distances 0 gets the top-left corner of its
  bounding box; points are (x, y) = (column, row);
* decoding: batches of ``batch_size`` prompts; with ``multimasking`` the mask with the
  highest predicted IoU (first on ties); masks are logits > ``mask_threshold`` (default the
  model's, 0), stability score with offset 1, boxes xyxy inclusive;
* box refinement: every mask (empty ones too) gives the box ``[x - 0.01 w, y - 0.01 h,
  x + 1.01 w, y + 1.01 h]`` with ``w = x1 - x0``, ``h = y1 - y0``, clipped to [0, W] x [0, H]
  (micro-sam clips x at H and y at W: the same on square images; see below);
* NMS: masks with area > ``min_size`` (strictly), score = predicted IoU x stability
  (float32), greedy by decreasing score, a mask is dropped when its IoU (or intersection over
  the smaller area) with a kept mask is above ``nms_threshold`` (in float32); the overlap of
  two masks whose inclusive boxes do not share two columns and two rows counts as 0;
* label image: kept masks painted by decreasing area (ties: higher score first), each only
  onto free pixels; then 4-connected pieces of each id become separate objects, pieces
  smaller than ``min_size`` are removed and ids are 1..K in the block-wise order above;
  uint32.

Known differences: prompts are scaled with the predictor's own transform (micro-sam always
uses a 1024 one: the same for SAM's 1024 input); ``mask_threshold="auto"`` (local Otsu) is
not supported; refinement boxes are clipped at the right image sides (micro-sam clips x at
the height H: on a wide image it cuts boxes at column H and turns those right of it inside
out; on a tall image likewise below row W); an image entirely covered by objects keeps all
of them (micro-sam's relabelling then turns its first object into background).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.measure import label as label_regions
from skimage.segmentation import find_boundaries

from .amg_utils import batched_mask_to_box, stability_score
from .automatic import Progress, run_to_end
from .automatic_params import _is_int, _is_real
from .instance_segmentation import seed_markers
from .mask_set import CompactMask, MaskSet

__all__ = [
    "ApgParameters",
    "instances_from_prompts",
    "point_prompts_from_decoder_outputs",
    "prompt_generation_job",
]

BLOCK = 512  # micro-sam's block shape for labelling and distances (elf.parallel)
HALO = 16  # its halo for the block-wise distance transform
BOX_EXTENSION = 0.01  # fraction of the mask box added on each side for box refinement
STABILITY_OFFSET = 1.0


@dataclass(frozen=True)
class ApgParameters:
    """Parameters of :func:`prompt_generation_job`, micro-sam's defaults.

    Attributes:
        min_size: masks of at most this many pixels are dropped before NMS, and pieces of
            fewer pixels after merging.
        center_distance_threshold, boundary_distance_threshold, foreground_threshold: seed
            thresholds in [0, 1] (see :func:`point_prompts_from_decoder_outputs`).
        multimasking: decode 3 masks per prompt and keep the one with the best predicted IoU.
        batch_size: prompts per decoder batch (one :class:`Progress` step each).
        nms_threshold: in [0, 1]; overlap above which the lower-scoring mask is dropped.
        intersection_over_min: overlap = intersection / smaller area instead of IoU.
        mask_threshold: logit threshold of the masks; None = the model's (0).
        refine_with_box_prompts: decode again with a box around each mask.
    """

    min_size: int = 25
    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    multimasking: bool = False
    batch_size: int = 32
    nms_threshold: float = 0.9
    intersection_over_min: bool = False
    mask_threshold: float | None = None
    refine_with_box_prompts: bool = False

    def validate(self) -> None:
        """ValueError(f"expected …, got …") for the first invalid field."""
        if not _is_int(self.min_size) or self.min_size < 0:
            raise ValueError(f"expected min_size an integer >= 0, got {self.min_size!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"expected batch_size an integer >= 1, got {self.batch_size!r}")
        for name in ("center_distance_threshold", "boundary_distance_threshold",
                     "foreground_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"expected {name} a number in [0, 1], got {value!r}")
        for name in ("multimasking", "intersection_over_min", "refine_with_box_prompts"):
            flag = getattr(self, name)
            if flag is not True and flag is not False and not isinstance(flag, np.bool_):
                raise ValueError(f"expected {name} True or False, got {flag!r}")
        t = self.mask_threshold
        if t is not None and (not _is_real(t) or not np.isfinite(float(t))):
            extra = " (micro-sam's local-Otsu 'auto' is not supported)" if t == "auto" else ""
            raise ValueError(f"expected mask_threshold None or a finite number{extra}, got {t!r}")


def point_prompts_from_decoder_outputs(
    foreground: np.ndarray, center_distances: np.ndarray, boundary_distances: np.ndarray, *,
    foreground_threshold: float = 0.5, center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
) -> np.ndarray:
    """One point prompt per seed component, micro-sam's points in micro-sam's order.

    Args:
        foreground, center_distances, boundary_distances: (H, W) float decoder outputs in
            [0, 1] at the image's size (see :func:`~napari_sam.engine.instance_segmentation.seed_markers`).
        foreground_threshold: seeds need ``foreground >= foreground_threshold``.
        center_distance_threshold, boundary_distance_threshold: and distances below these.
    Returns:
        points_xy: (N, 2) float64, (x, y) = (column, row) pixels, integral values; (0, 2)
        when there is no seed.
    """
    seeds = seed_markers(
        foreground, center_distances, boundary_distances, foreground_threshold=foreground_threshold,
        center_distance_threshold=center_distance_threshold,
        boundary_distance_threshold=boundary_distance_threshold, connectivity=1, foreground_inclusive=True,
    )
    if not seeds.any():
        return np.zeros((0, 2), dtype=np.float64)
    free = ~find_boundaries(seeds, mode="outer")  # distances are measured to the outline...
    free[[0, -1], :] = False  # ...and to the image border
    free[:, [0, -1]] = False
    distances = _blockwise_distances(free, seeds > 0)
    components = _label_blockwise(seeds)  # micro-sam's numbering decides the order

    flat = np.flatnonzero(components)  # (P,) row-major indices of seed pixels
    ids, dist = components.ravel()[flat], distances.ravel()[flat]
    order = np.lexsort((flat, -dist, ids))  # per id: farthest first, then row-major
    first = order[np.r_[0, np.flatnonzero(np.diff(ids[order])) + 1]]  # (N,) one per id
    rows, cols = np.unravel_index(flat[first], components.shape)
    zero_max = np.flatnonzero(dist[first] == 0)  # argmax over an all-zero bounding box
    if zero_max.size:
        boxes = ndimage.find_objects(components)  # [id - 1] -> (rows, cols) slices
        for k in zero_max:
            box = boxes[ids[first[k]] - 1]
            rows[k], cols[k] = box[0].start, box[1].start
    return np.stack([cols, rows], axis=1).astype(np.float64)


def prompt_generation_job(
    predictor, foreground: np.ndarray, center_distances: np.ndarray, boundary_distances: np.ndarray,
    params: ApgParameters = ApgParameters(), cancel=None,
) -> Generator[Progress, None, np.ndarray | None]:
    """APG as a long job: yields a :class:`Progress` per decoded batch, returns the labels.

    Args:
        predictor: a :class:`~napari_sam.engine.predictor.SamPredictor` already holding the
            image's embedding (``set_image`` or ``set_embedding``); it is not changed.
        foreground, center_distances, boundary_distances: (H, W) float decoder outputs in
            [0, 1], (H, W) = ``predictor.original_size``.
        params: :class:`ApgParameters`.
        cancel: optional ``threading.Event``, checked before every decoder call: once set,
            the job stops and returns None (closing the generator stops it too).
    Returns:
        the job; its value is the (H, W) uint32 label image, 0 = background, objects 1..K,
        or None if cancelled.
    Raises:
        ValueError: at the call, before any work: invalid parameters, maps of another size
            than the image's, no image set on the predictor.
    """
    params.validate()
    if not getattr(predictor, "is_image_set", False):
        raise ValueError("expected a predictor holding the image's embedding (call set_image or "
                         "set_embedding first), got one with no image set")
    size = tuple(predictor.original_size)
    for name, array in (("foreground", foreground), ("center_distances", center_distances),
                        ("boundary_distances", boundary_distances)):
        if np.shape(array) != size:
            raise ValueError(f"expected {name} of the image's size {size}, got shape {np.shape(array)}")
    points_xy = point_prompts_from_decoder_outputs(
        foreground, center_distances, boundary_distances, foreground_threshold=params.foreground_threshold,
        center_distance_threshold=params.center_distance_threshold,
        boundary_distance_threshold=params.boundary_distance_threshold,
    )
    return _job(predictor, points_xy, params, cancel)


def _job(predictor, points_xy: np.ndarray, params: ApgParameters,
         cancel) -> Generator[Progress, None, np.ndarray | None]:
    """The work of :func:`prompt_generation_job` once its inputs are checked."""
    size = tuple(predictor.original_size)
    if len(points_xy) == 0:
        return np.zeros(size, dtype=np.uint32)
    n_batches = -(-len(points_xy) // params.batch_size)
    total = n_batches * (2 if params.refine_with_box_prompts else 1)
    masks = yield from _decode(predictor, params, points_xy, None, cancel, 0, total)
    if masks is not None and params.refine_with_box_prompts:
        boxes_xyxy = _refinement_boxes(masks.boxes, size)
        masks = yield from _decode(predictor, params, points_xy, boxes_xyxy, cancel, n_batches, total)
    if masks is None or (cancel is not None and cancel.is_set()):
        return None
    return _merge(masks, params)


def instances_from_prompts(predictor, foreground: np.ndarray, center_distances: np.ndarray,
                           boundary_distances: np.ndarray, params: ApgParameters = ApgParameters(),
                           callback=None) -> np.ndarray:
    """:func:`prompt_generation_job` run to the end (``callback(Progress)`` per batch):
    the (H, W) uint32 label image, 0 = background."""
    job = prompt_generation_job(predictor, foreground, center_distances, boundary_distances, params)
    return run_to_end(job, callback)


# ---------------------------------------------------------------------- decoding
def _decode(predictor, params: ApgParameters, points_xy: np.ndarray, boxes_xyxy: np.ndarray | None,
            cancel, done: int, total: int) -> Generator[Progress, None, MaskSet | None]:
    """Decode the points (or, if given, the boxes: one per point) in batches.

    Returns a MaskSet with one mask per prompt, in prompt order (None if cancelled)."""
    size = tuple(predictor.original_size)
    kind = "points" if boxes_xyxy is None else "boxes"
    chunk = 4 if predictor.device.type == "cpu" else params.batch_size  # small calls stay in cache
    parts, n = [], len(points_xy)
    for start in range(0, n, params.batch_size):
        stop = min(start + params.batch_size, n)
        batch = []
        for lo in range(start, stop, chunk):
            if cancel is not None and cancel.is_set():
                return None
            hi = min(lo + chunk, stop)
            batch.append(_decode_chunk(predictor, params, points_xy[lo:hi],
                                       None if boxes_xyxy is None else boxes_xyxy[lo:hi]))
        parts.append(MaskSet.concat(size, batch))
        done += 1
        yield Progress(done, total, f"{kind} {stop}/{n}")
    return MaskSet.concat(size, parts)


@torch.inference_mode()
def _decode_chunk(predictor, params: ApgParameters, points_xy: np.ndarray,
                  boxes_xyxy: np.ndarray | None) -> MaskSet:
    """(B, 2) points or (B, 4) boxes, original pixels -> MaskSet of B masks."""
    size = tuple(predictor.original_size)
    device, model = predictor.device, predictor.model
    if boxes_xyxy is None:
        coords = predictor.transform.apply_coords(points_xy[:, None], size)  # (B, 1, 2)
        coords = torch.as_tensor(coords, dtype=torch.float32, device=device)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)  # (B, 1)
        low_res, iou = predictor.decode_low_res(coords, labels, None, None, params.multimasking)
    else:
        boxes = predictor.transform.apply_boxes(boxes_xyxy, size)  # (B, 4)
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        low_res, iou = predictor.decode_low_res(None, None, boxes, None, params.multimasking)
    # low_res: (B, C, h, w), iou: (B, C); keep the best of C (first on ties)
    best = iou.max(dim=1).indices  # (B,)
    rows = torch.arange(len(best), device=best.device)
    low_res, iou = low_res[rows, best][:, None], iou[rows, best]  # (B, 1, h, w), (B,)
    logits = model.postprocess_masks(low_res, predictor.input_size, size)[:, 0]  # (B, H, W)
    threshold = model.mask_threshold if params.mask_threshold is None else float(params.mask_threshold)
    stability = stability_score(logits, threshold, STABILITY_OFFSET)  # (B,)
    binary = logits > threshold
    boxes = batched_mask_to_box(binary).cpu()  # (B, 4) inclusive xyxy, zeros if empty
    binary = binary.cpu().numpy()
    return MaskSet(
        size,
        [CompactMask.from_array(m, b) for m, b in zip(binary, boxes.tolist())],
        boxes=boxes.numpy().astype(np.int64).reshape(-1, 4),
        predicted_iou=iou.float().cpu().numpy(),
        stability_score=stability.float().cpu().numpy(),
        points=np.asarray(points_xy, dtype=np.float64).reshape(-1, 2),
        crop_boxes=np.tile(np.array([0, 0, size[1], size[0]], np.int64), (len(binary), 1)),
    )


def _refinement_boxes(boxes_xyxy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) inclusive mask boxes -> (N, 4) float64 box prompts in [0, W] x [0, H],
    micro-sam's arithmetic (its clipping of x at H and y at W corrected)."""
    x, y = boxes_xyxy[:, 0].astype(np.float64), boxes_xyxy[:, 1].astype(np.float64)
    w, h = boxes_xyxy[:, 2] - boxes_xyxy[:, 0], boxes_xyxy[:, 3] - boxes_xyxy[:, 1]
    grow = 1 + BOX_EXTENSION
    return np.stack([np.maximum(x - w * BOX_EXTENSION, 0), np.maximum(y - h * BOX_EXTENSION, 0),
                     np.minimum(x + grow * w, size[1]), np.minimum(y + grow * h, size[0])], axis=1)


# ---------------------------------------------------------------------- NMS and merging
def _merge(masks: MaskSet, params: ApgParameters) -> np.ndarray:
    """Size filter, mask NMS, painting and relabelling -> (H, W) uint32 labels."""
    if params.min_size > 0:
        masks = masks.filter(masks.areas > params.min_size)
    labels = np.zeros(masks.image_size, dtype=np.uint32)
    if len(masks) == 0:
        return labels
    masks = masks.filter(_mask_nms(masks, params.nms_threshold, params.intersection_over_min))
    # paint by decreasing area (stable: the NMS order, best score first, breaks ties)
    for k, i in enumerate(np.argsort(-masks.areas, kind="stable"), start=1):
        x0, y0, x1, y1 = masks.masks[i].box
        region = labels[y0 : y1 + 1, x0 : x1 + 1]  # a view
        region[masks.masks[i].crop() & (region == 0)] = k
    pieces = _label_blockwise(labels)
    sizes = np.bincount(pieces.ravel())
    lut = np.zeros(len(sizes), dtype=np.uint32)
    keep = np.flatnonzero(sizes >= params.min_size)
    keep = keep[keep > 0]
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.uint32)
    return lut[pieces]


def _mask_nms(masks: MaskSet, threshold: float, over_min: bool) -> np.ndarray:
    """Greedy mask NMS -> (K,) indices of the kept masks, best score first.

    Overlaps are float32 as micro-sam computes them and compared with float32(threshold);
    the visiting order is ``torch.argsort`` of the same float32 scores (its tie order)."""
    scores = torch.from_numpy(masks.predicted_iou.astype(np.float32)) * torch.from_numpy(
        masks.stability_score.astype(np.float32))
    order = torch.argsort(scores, descending=True).numpy()
    boxes, areas = masks.boxes, masks.areas
    limit = np.float32(threshold)
    crops = [m.crop() for m in masks.masks]
    alive = np.ones(len(masks), dtype=bool)
    keep = []
    for rank, i in enumerate(order):
        if not alive[i]:
            continue
        keep.append(i)
        rest = order[rank + 1 :]
        rest = rest[alive[rest]]
        lo = np.maximum(boxes[rest, :2], boxes[i, :2])  # (R, 2) x, y
        hi = np.minimum(boxes[rest, 2:], boxes[i, 2:])
        for j, (ox0, oy0), (ox1, oy1) in zip(rest, lo, hi):
            if ox1 - ox0 <= 0 or oy1 - oy0 <= 0:  # micro-sam: no overlap, overlap value 0
                continue
            inter = _intersection(crops[i], boxes[i], crops[j], boxes[j], (ox0, oy0, ox1, oy1))
            if over_min:
                value = np.float32(inter) / (np.float32(min(areas[i], areas[j])) + np.float32(1e-6))
            else:
                value = np.float32(inter) / np.float32(areas[i] + areas[j] - inter)
            if value > limit:
                alive[j] = False
    return np.array(keep, dtype=np.int64)


def _intersection(crop_a, box_a, crop_b, box_b, window) -> int:
    """Pixels in both masks inside the inclusive ``window`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = window
    a = crop_a[y0 - box_a[1] : y1 - box_a[1] + 1, x0 - box_a[0] : x1 - box_a[0] + 1]
    b = crop_b[y0 - box_b[1] : y1 - box_b[1] + 1, x0 - box_b[0] : x1 - box_b[0] + 1]
    return int(np.count_nonzero(a & b))


# ---------------------------------------------------------------------- micro-sam's blocks
def _blocks(shape: tuple[int, int]):
    """(rows, cols) slices of the BLOCK x BLOCK tiling of ``shape``, blocks in row-major order."""
    for r0 in range(0, shape[0], BLOCK):
        for c0 in range(0, shape[1], BLOCK):
            yield slice(r0, min(r0 + BLOCK, shape[0])), slice(c0, min(c0 + BLOCK, shape[1]))


def _blockwise_distances(free: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """(H, W) distance of each pixel to the nearest False pixel of ``free``, as micro-sam's
    block-wise transform computes it (each block sees only itself plus a HALO margin); only
    blocks with a ``needed`` pixel are computed (others stay 0)."""
    h, w = free.shape
    out = np.zeros(free.shape, dtype=np.float64)
    for rows, cols in _blocks(free.shape):
        if not needed[rows, cols].any():
            continue
        r0, c0 = max(rows.start - HALO, 0), max(cols.start - HALO, 0)
        r1, c1 = min(rows.stop + HALO, h), min(cols.stop + HALO, w)
        dist = ndimage.distance_transform_edt(free[r0:r1, c0:c1])
        out[rows, cols] = dist[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    return out


def _label_blockwise(image: np.ndarray) -> np.ndarray:
    """4-connected regions of equal non-zero value -> (H, W) int64 ids 1..N, numbered as
    micro-sam's ``elf.parallel.label`` numbers them with 512 x 512 blocks: row-major within
    each block, blocks in row-major order, pieces joined across block faces by a union-find
    (union by rank; on equal rank the later block's id is the root) and ids made consecutive
    in root order. Row-major order of first pixels for images up to 512 x 512."""
    h, w = image.shape
    if h <= BLOCK and w <= BLOCK:
        return label_regions(image, background=0, connectivity=1).astype(np.int64)
    local, base = np.zeros(image.shape, dtype=np.int64), 0  # block ids, offset to be unique
    for rows, cols in _blocks(image.shape):
        block = label_regions(image[rows, cols], background=0, connectivity=1)
        local[rows, cols] = np.where(block > 0, block + base, 0)
        base += int(block.max())
    parent, rank = np.arange(base + 1), np.zeros(base + 1, dtype=np.int64)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for rows, cols in _blocks(image.shape):
        faces = []
        if rows.start > 0:  # first row of this block against the last row of the block above
            faces.append((local[rows.start, cols], local[rows.start - 1, cols],
                          image[rows.start, cols], image[rows.start - 1, cols]))
        if cols.start > 0:  # first column against the last column of the block to the left
            faces.append((local[rows, cols.start], local[rows, cols.start - 1],
                          image[rows, cols.start], image[rows, cols.start - 1]))
        for ids, other, values, other_values in faces:
            touch = (values != 0) & (values == other_values)
            for a, b in np.unique(np.stack([ids[touch], other[touch]], axis=1), axis=0):
                ra, rb = find(a), find(b)
                if ra == rb:
                    continue
                if rank[ra] < rank[rb]:
                    ra, rb = rb, ra
                parent[rb] = ra
                if rank[ra] == rank[rb]:
                    rank[ra] += 1
    roots = np.array([find(x) for x in range(base + 1)])
    _, consecutive = np.unique(roots, return_inverse=True)  # root 0 (background) stays 0
    return consecutive[local]
