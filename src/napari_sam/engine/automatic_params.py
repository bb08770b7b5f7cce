"""Checks of :class:`~napari_sam.engine.automatic.SamAutomaticMaskGenerator`'s parameters,
made before any work (``ValueError(f"expected …, got …")``)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .mask_set import OUTPUT_MODES

# Layer i of crops adds 4**i crops, each encoded like a whole image: 3 layers already encode
# 1 + 4 + 16 + 64 = 85 images (minutes with vit_h on a CPU); 5 would encode 1365.
MAX_CROP_LAYERS = 3


def _check_parameters(**p) -> None:
    """ValueError(f"expected …, got …") for the first invalid generator parameter."""
    if (p["points_per_side"] is None) == (p["point_grids"] is None):
        raise ValueError(
            "expected exactly one of points_per_side or point_grids, got "
            f"points_per_side={p['points_per_side']!r} and "
            f"point_grids={'None' if p['point_grids'] is None else 'a list'}"
        )
    n_layers = p["crop_n_layers"]
    if not _is_int(n_layers) or not 0 <= n_layers <= MAX_CROP_LAYERS:
        images = (
            f" ({sum(4**i for i in range(n_layers + 1))} encoded images)" if _is_int(n_layers) and n_layers > 0 else ""
        )
        raise ValueError(
            f"expected crop_n_layers an integer in [0, {MAX_CROP_LAYERS}], got {n_layers!r}{images}: "
            "crop layer i adds 4**i crops, each encoded like a whole image, so "
            f"{MAX_CROP_LAYERS} layers already encode {sum(4**i for i in range(MAX_CROP_LAYERS + 1))} "
            "images (minutes to hours on a CPU); for small objects prefer more points per side"
        )
    for name, low in (("points_per_batch", 1), ("crop_n_points_downscale_factor", 1), ("upsample_budget", 1)):
        if not _is_int(p[name]) or p[name] < low:
            raise ValueError(f"expected {name} an integer >= {low}, got {p[name]!r}")
    if p["decode_chunk"] is not None and (not _is_int(p["decode_chunk"]) or p["decode_chunk"] < 1):
        raise ValueError(f"expected decode_chunk None or an integer >= 1, got {p['decode_chunk']!r}")
    side = p["points_per_side"]
    if side is not None:
        if not _is_int(side) or side < 1:
            raise ValueError(f"expected points_per_side an integer >= 1, got {side!r}")
        factor = p["crop_n_points_downscale_factor"]
        if side // factor**n_layers < 1:
            raise ValueError(
                f"expected at least 1 point per side in every crop layer, got points_per_side={side} "
                f"with crop_n_points_downscale_factor={factor} and crop_n_layers={n_layers}: layer "
                f"{n_layers} would have int({side} / {factor}**{n_layers}) = 0 points per side"
            )
    ranges = (  # name, low, high, high included, what it means
        ("pred_iou_thresh", 0, 1, True, "masks whose predicted IoU is not above it are dropped; 0 keeps all"),
        ("stability_score_thresh", 0, 1, True, "masks less stable than it are dropped; 0 keeps all"),
        ("box_nms_thresh", 0, 1, True, "box IoU above which the weaker of two masks is dropped; 1 keeps all"),
        ("crop_nms_thresh", 0, 1, True, "the same between crops"),
        ("crop_overlap_ratio", 0, 1, False, "fraction of the crop size by which crops overlap"),
        ("stability_score_offset", 0, math.inf, False, "the logit offset of the stability score"),
        ("min_mask_region_area", 0, math.inf, False, "holes and islands smaller than it (pixels) are removed; 0: none"),
    )
    for name, low, high, closed, meaning in ranges:
        value = p[name]
        ok = _is_real(value) and math.isfinite(value) and low <= value and (value <= high if closed else value < high)
        if not ok:
            interval = f"[{low}, {high}]" if closed else (f"[{low}, {high})" if math.isfinite(high) else f">= {low}")
            where = f"in {interval}" if interval[0] == "[" else interval
            raise ValueError(f"expected {name} a finite number {where} ({meaning}), got {value!r}")
    if p["output_mode"] not in OUTPUT_MODES:
        raise ValueError(f"expected output_mode in {OUTPUT_MODES}, got {p['output_mode']!r}")


def _checked_point_grids(point_grids, crop_n_layers: int) -> list[np.ndarray]:
    """One (N, 2) grid of (x, y) in [0, 1] per crop layer, as float64 arrays."""
    try:
        grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
    except (TypeError, ValueError):
        raise ValueError(f"expected point_grids a list of (N, 2) arrays of numbers, got {point_grids!r}") from None
    if len(grids) < crop_n_layers + 1 or any(
        g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or not np.isfinite(g).all() or g.min() < 0 or g.max() > 1
        for g in grids
    ):
        raise ValueError(
            f"expected {crop_n_layers + 1} point grids of shape (N, 2), N >= 1, in [0, 1], got "
            f"{[g.shape for g in grids]} with values in "
            f"{[(float(g.min()), float(g.max())) if g.size else None for g in grids]}"
        )
    return grids


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
