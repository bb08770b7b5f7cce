"""Segment everything: SAM's automatic mask generator, as a long job with progress.

:class:`SamAutomaticMaskGenerator` has the constructor, defaults and ``generate(image)``
records of ``segment_anything.SamAutomaticMaskGenerator`` (change the import and scripts
keep working) and returns the same masks. What differs is how the work is done:

* decoding a batch of grid points stops at the low-res logits, and the mask upscaling (most
  of a prompt's decoder cost) runs only for prompts with a mask above the predicted-IoU
  threshold (``decode_low_res_above``: the IoU is known before the upscaling); an exact upper
  bound of the stability score
  (:class:`~napari_sam.engine.amg_utils.StabilityBound`) drops unstable masks before any
  upsampling. Only the survivors are upsampled, a few at a time (at their borders only where
  the logits are smooth: ``postprocess_thresholded``), for the exact score, box and
  crop-edge test, and then kept as bit-packed bounding-box crops (:class:`MaskSet`), so memory
  stays bounded whatever the grid size;
* NMS is our own greedy vectorised code (no torchvision), small-region clean-up uses
  scikit-image (no OpenCV);
* :meth:`SamAutomaticMaskGenerator.run` is a generator that yields :class:`Progress` and
  returns the :class:`MaskSet` — stop iterating to cancel; nothing outside it changes. It
  accepts an :class:`~napari_sam.engine.predictor.ImageEmbedding` computed elsewhere (e.g.
  by the interactive widget) so the image is not encoded twice; a cancel (``cancel=Event``
  or the job runner's ``stop_when``) acts between decoder calls and upsampling chunks;
* stacks (and the AIS / APG modes) go through
  :class:`napari_sam.engine.instances.SamInstanceSegmenter`, whose ``stack_job`` runs any
  mode slice by slice and links the objects of consecutive slices into one id each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..model.interrupt import StopCheck
from .amg_utils import (
    StabilityBound,
    batched_mask_to_box,
    box_area,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    nms,
    stability_from_counts,
)
from .automatic_params import (
    MAX_CROP_LAYERS,  # noqa: F401  (public here: documented above)
    _check_parameters,
    _checked_point_grids,
)
from .image import resized_shape, to_rgb_uint8
from .label_image import masks_to_label_image
from .mask_set import (
    CompactMask,
    MaskSet,
    postprocess_small_regions,
    require_pycocotools,
)
from .predictor import ImageEmbedding, SamPredictor, full_res_masks

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a long job: ``done`` of ``total`` units, and what is being done."""

    done: int
    total: int
    message: str = ""


def run_to_end(job: Generator[Progress, None, T], callback: Callable[[Progress], None] | None = None) -> T:
    """Drive a long job synchronously (optionally reporting each step); returns its result."""
    while True:
        try:
            step = next(job)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(step)


class SamAutomaticMaskGenerator:
    """Masks for everything in an image, from a grid of point prompts.

    Arguments and defaults are the reference's (see ``segment_anything``'s docstring);
    ``min_mask_region_area > 0`` uses scikit-image instead of OpenCV; ``output_mode``
    "coco_rle" needs pycocotools. ``model`` is a :class:`~napari_sam.model.Sam` (or any
    model with the engine interface).

    Every parameter is checked here, before any work (``ValueError(f"expected …, got …")``):
    thresholds finite and in [0, 1], ``crop_overlap_ratio`` in [0, 1), ``crop_n_layers`` at
    most :data:`MAX_CROP_LAYERS`. Crops that a small image leaves empty are skipped.

    Keyword-only:
        upsample_budget: at most this many float32 values of full-resolution logits are
            held at once (masks are upsampled in chunks of that size).
        decode_chunk: prompts per decoder call within a batch. None: 4 on a CPU, where the
            decoder is memory-bound and small calls stay in cache (about 2x faster per prompt
            than 64 at once on a 2-core machine), else ``points_per_batch``. Results do not
            depend on it.
    """

    def __init__(
        self,
        model,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        upsample_budget: int = 2**25,
        decode_chunk: int | None = None,
    ) -> None:
        _check_parameters(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
            upsample_budget=upsample_budget,
            decode_chunk=decode_chunk,
        )
        if points_per_side is not None:
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        point_grids = _checked_point_grids(point_grids, crop_n_layers)
        if output_mode == "coco_rle":
            require_pycocotools()
        self.predictor = SamPredictor(model)
        self.point_grids = point_grids
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = math.ceil(min_mask_region_area)  # areas are integers
        self.output_mode = output_mode
        self.upsample_budget = int(upsample_budget)
        if decode_chunk is None:
            decode_chunk = 4 if self.predictor.device.type == "cpu" else self.points_per_batch
        self.decode_chunk = int(decode_chunk)

    # ------------------------------------------------------------------ public API
    def generate(self, image: np.ndarray) -> list[dict]:
        """Reference-compatible: (H, W[, C]) image -> list of mask records (see
        :meth:`MaskSet.to_records`), in ``self.output_mode``."""
        return run_to_end(self.run(image)).to_records(self.output_mode)

    def generate_labels(self, image: np.ndarray, min_size: int = 0) -> np.ndarray:
        """(H, W[, C]) image -> (H, W) int32 label image (see :func:`masks_to_label_image`)."""
        return masks_to_label_image(run_to_end(self.run(image)), min_size=min_size)

    def run(
        self,
        image: np.ndarray,
        *,
        embedding: ImageEmbedding | None = None,
        contrast_limits: tuple[float, float] | None = None,
        cancel=None,
    ) -> Generator[Progress, None, MaskSet]:
        """The generation as a long job: yields :class:`Progress`, returns a :class:`MaskSet`.

        Args:
            image: (H, W) or (H, W, 1|3|4), any real dtype (normalised as
                :func:`~napari_sam.engine.image.to_rgb_uint8`; uint8 RGB passes unchanged).
            embedding: the whole image's embedding, if already computed by this model (crop
                layers >= 1 are always encoded here).
            contrast_limits: optional (low, high) mapped to 0..255 before encoding.
            cancel: optional ``threading.Event``. Once it is set, the job raises
                :class:`~napari_sam.engine.predictor.Stopped` within a decoder call or an
                upsampling chunk (well under a second), wherever it is; so does a stop
                check installed with :func:`~napari_sam.model.interrupt.stop_when` around
                ``next(job)`` (the widget's job runner). Closing the generator between steps
                also stops it. Nothing outside the job changes.
        Raises:
            Stopped: the job was cancelled.
        """
        rgb = to_rgb_uint8(image, contrast_limits)
        orig_size = rgb.shape[:2]
        if embedding is not None and tuple(embedding.original_size) != orig_size:
            raise ValueError(
                f"expected an embedding of an image of size {orig_size}, "
                f"got one of size {tuple(embedding.original_size)}"
            )
        stop = StopCheck(cancel)
        crop_boxes, layer_idxs = self._crop_boxes(orig_size)
        batches = [-(-len(self.point_grids[i]) // self.points_per_batch) for i in layer_idxs]
        total = sum(batches) + len(crop_boxes) - (embedding is not None)
        done, parts = 0, []
        for k, (crop_box, layer_idx) in enumerate(zip(crop_boxes, layer_idxs)):
            job = self._process_crop(rgb, crop_box, layer_idx, embedding if k == 0 else None, stop)
            while True:
                try:
                    message = next(job)
                except StopIteration as end:
                    parts.append(end.value)
                    break
                done += 1
                yield Progress(done, total, f"crop {k + 1}/{len(crop_boxes)}: {message}")
        stop()
        data = MaskSet.concat(orig_size, parts)
        if len(crop_boxes) > 1:  # duplicates between crops: prefer masks from smaller crops
            scores = 1 / box_area(torch.from_numpy(data.crop_boxes))
            data = data.filter(nms(torch.from_numpy(data.boxes).float(), scores, self.crop_nms_thresh).numpy())
        if self.min_mask_region_area > 0:
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            data = postprocess_small_regions(data, self.min_mask_region_area, nms_thresh, stop)
        return data

    # ------------------------------------------------------------------ internals
    def _crop_boxes(self, image_size: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
        """The reference's crop boxes (layer 0: the whole image), less the crops of layers >= 1
        that a small image leaves empty ([x0, y0, x1, y1] with x1 <= x0 or y1 <= y0) or too
        thin to resize to the model's input. The reference fails on those ("non-empty image");
        where it works, nothing is dropped."""
        boxes, layers = generate_crop_boxes(image_size, self.crop_n_layers, self.crop_overlap_ratio)
        long_side = self.predictor.transform.target_length
        kept = [
            (box, layer)
            for box, layer in zip(boxes, layers)
            if layer == 0  # the whole image: if unusable, the predictor says why
            or (box[2] > box[0] and box[3] > box[1] and min(resized_shape(box[3] - box[1], box[2] - box[0], long_side)) >= 1)
        ]
        return [b for b, _ in kept], [layer for _, layer in kept]

    def _process_crop(
        self, rgb: np.ndarray, crop_box: list[int], layer_idx: int, embedding: ImageEmbedding | None, stop
    ) -> Generator[str, None, MaskSet]:
        """Masks of one crop, in image coordinates, after NMS within the crop."""
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        if embedding is None:
            # the encoder checks the event (or an enclosing stop_when) between its blocks
            crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
            embedding = self.predictor.encode_image(crop, cancel=stop.cancel)
            yield "encoded"
        self.predictor.set_embedding(embedding)
        bound = None
        if self.stability_score_thresh > 0:
            model = self.predictor.model
            bound = StabilityBound(
                self.predictor.low_res_size, model.image_size, self.predictor.input_size, crop_size
            )
        points_xy = self.point_grids[layer_idx] * np.array(crop_size, dtype=np.float64)[None, ::-1]
        parts, n = [], len(points_xy)
        try:
            for start in range(0, n, self.points_per_batch):
                batch = points_xy[start : start + self.points_per_batch]
                parts.append(self._process_batch(batch, crop_box, rgb.shape[:2], bound, stop))
                yield f"points {min(start + self.points_per_batch, n)}/{n}"
        finally:
            self.predictor.reset_image()
        data = MaskSet.concat(rgb.shape[:2], parts)
        keep = nms(torch.from_numpy(data.boxes).float(), torch.from_numpy(data.predicted_iou), self.box_nms_thresh)
        data = data.filter(keep.numpy())
        offset = np.array([x0, y0])
        data.boxes = data.boxes + np.tile(offset, 2)
        data.points = data.points + offset
        data.crop_boxes = np.tile(np.array(crop_box, dtype=np.int64), (len(data), 1))
        return data

    @torch.inference_mode()
    def _process_batch(self, points_xy: np.ndarray, crop_box, orig_size, bound, stop) -> MaskSet:
        """Decode (B, 2) crop-pixel points; keep masks passing the filters. ``stop()`` raises
        :class:`Stopped` once the job is cancelled: it is called between decoder calls and
        upsampling chunks, each well under a second.

        Returns a MaskSet with boxes and points in crop coordinates, masks in image coordinates.
        """
        pred = self.predictor
        model = pred.model
        threshold, offset = model.mask_threshold, self.stability_score_offset
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        coords = torch.as_tensor(pred.transform.apply_coords(points_xy, crop_size), dtype=torch.float32)
        coords = coords.to(pred.device)[:, None]  # (B, 1, 2)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=pred.device)  # (B, 1)
        # masks are made only for prompts with a mask above the IoU threshold (the
        # reference keeps masks with iou > thresh, and none when thresh is 0)
        min_iou = self.pred_iou_thresh if self.pred_iou_thresh > 0 else -math.inf
        prompts, low_res, iou = [], [], []
        for i in range(0, len(coords), self.decode_chunk):
            stop()
            rows, low, scores = pred.decode_low_res_above(
                coords[i : i + self.decode_chunk], labels[i : i + self.decode_chunk], min_iou
            )
            prompts.append(rows.cpu() + i)
            low_res.append(low)
            iou.append(scores.float().cpu())
        stop()
        iou = torch.cat(iou)  # (B, K)
        n_masks = iou.shape[1]
        low_res = torch.cat(low_res).flatten(0, 1)  # (P*K, h, w) of the P prompts kept
        # flat index (prompt * K + k) of each decoded mask, in the reference's order
        decoded = (torch.cat(prompts)[:, None] * n_masks + torch.arange(n_masks)).flatten()
        iou = iou.flatten()  # (B*K,)
        position = torch.arange(len(decoded))  # row in low_res
        if self.pred_iou_thresh > 0:
            position = position[iou[decoded] > self.pred_iou_thresh]
        if bound is not None and len(position):
            upper = bound.upper(low_res[position], threshold, offset).cpu()
            position = position[upper >= self.stability_score_thresh - 1e-6]  # float32 slack

        h, w = crop_size
        chunk = max(1, self.upsample_budget // (model.image_size**2 + h * w))
        kept, masks, boxes, scores = [], [], [], []
        for start in range(0, len(position), chunk):
            stop()
            idx = position[start : start + chunk]
            above_hi, above_lo, binary = (
                m[0]
                for m in full_res_masks(
                    model, low_res[idx.to(low_res.device)][None], pred.input_size, crop_size,
                    [threshold + offset, threshold - offset, threshold],
                )
            )  # 3 x (k, h, w) bool
            stability = stability_from_counts(_count(above_hi), _count(above_lo))
            ok = stability >= self.stability_score_thresh
            if self.stability_score_thresh <= 0:
                ok = torch.ones_like(ok)
            binary = binary[ok.to(binary.device)]
            box = batched_mask_to_box(binary).cpu()
            edge_ok = ~is_box_near_crop_edge(box, crop_box, [0, 0, orig_size[1], orig_size[0]])
            binary = binary[edge_ok.to(binary.device)].cpu().numpy()
            box = box[edge_ok]
            masks += [CompactMask.from_array(m, b, (x0, y0)) for m, b in zip(binary, box.tolist())]
            kept.append(decoded[idx][ok][edge_ok])
            boxes.append(box)
            scores.append(stability[ok][edge_ok])
        if not kept:
            return MaskSet(orig_size)
        kept = torch.cat(kept).numpy()
        return MaskSet(
            orig_size,
            masks,
            boxes=torch.cat(boxes).numpy().astype(np.int64).reshape(-1, 4),
            predicted_iou=iou.numpy()[kept].astype(np.float32),
            stability_score=torch.cat(scores).numpy().astype(np.float32),
            points=points_xy[kept // n_masks],
            crop_boxes=np.zeros((len(kept), 4), np.int64),
        )


def _count(masks: torch.Tensor) -> torch.Tensor:
    """(k, H, W) bool -> (k,) int32 pixel counts."""
    return masks.sum(dim=(-2, -1), dtype=torch.int32).cpu()
