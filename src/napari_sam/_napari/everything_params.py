"""The Segment Everything widget's choices and parameter specs: modes and their tips, and
per-mode parameter fields (name: (minimum, maximum, step or None for ints, help)). AIS/APG
defaults come from the engine's parameter classes, AMG's from SamAutomaticMaskGenerator."""

from __future__ import annotations

import inspect

from ..engine.automatic import SamAutomaticMaskGenerator

MODE_CHOICES = (("ais", "AIS: instance decoder (seconds)"), ("apg", "APG: decoder prompts + SAM"),
                ("amg", "AMG: SAM point grid (slow on CPU)"))
MODE_TIPS = {
    "ais": "automatic instance segmentation (micro-sam): the model's instance decoder predicts "
           "foreground and distances, a watershed separates the objects. Needs a model with a "
           "decoder (the 'AIS' entries, e.g. vit_b_lm); seconds per slice on a CPU",
    "apg": "automatic prompt generation (micro-sam): points at the decoder's object centres, "
           "decoded by SAM; often sharper outlines than AIS, slower. Needs a model with a decoder",
    "amg": "SAM's automatic mask generator: a grid of point prompts; any model, minutes per "
           "slice on a CPU",
}

# name: (minimum, maximum, step or None for ints, help); AIS/APG defaults come from the
# engine's parameter classes, AMG's are SamAutomaticMaskGenerator's (AMG_DEFAULTS)
AMG_SPEC = {
    "points_per_side": (1, 128, None, "grid of points per image side (32 x 32 = 1024 prompts)"),
    "points_per_batch": (1, 1024, None, "prompts decoded together (memory vs speed)"),
    "pred_iou_thresh": (0.0, 1.0, 0.01, "keep masks whose predicted quality is above this"),
    "stability_score_thresh": (0.0, 1.0, 0.01, "keep masks that stay the same when the cut-off moves"),
    "box_nms_thresh": (0.0, 1.0, 0.05, "drop a mask whose box overlaps a better one more than this"),
    "crop_n_layers": (0, 3, None, "also run on 2^n x 2^n zoomed crops (finds small objects; slower)"),
    "min_mask_region_area": (0, 100000, None, "fill holes / drop islands smaller than this (pixels)"),
    "min_size": (0, 100000, None, "drop objects with fewer visible pixels in the label image"),
}
_AMG_SIGNATURE = inspect.signature(SamAutomaticMaskGenerator).parameters
AMG_DEFAULTS = {**{name: _AMG_SIGNATURE[name].default for name in AMG_SPEC if name != "min_size"},
                "min_size": 0}  # min_size: of the label image (masks_to_label_image)
_SEEDS = {
    "center_distance_threshold": (0.0, 1.0, 0.05, (
        "seeds: pixels whose predicted distance to their object's centre (0 = centre, 1 = "
        "edge) is below this; lower = fewer, surer seeds")),
    "boundary_distance_threshold": (0.0, 1.0, 0.05, (
        "seeds: pixels whose predicted boundary map (0 = deep inside, 1 = on the boundary) "
        "is below this; lower = fewer seeds")),
    "foreground_threshold": (0.0, 1.0, 0.05, (
        "pixels with a predicted object probability above this belong to objects")),
}
AIS_SPEC = {
    **_SEEDS,
    "foreground_smoothing": (0.0, 10.0, 0.1, "Gaussian sigma (pixels) smoothing the foreground map; 0: none"),
    "distance_smoothing": (0.0, 10.0, 0.1, "Gaussian sigma (pixels) smoothing the distance maps"),
    "min_size": (0, 100000, None, "drop objects smaller than this (pixels)"),
}
APG_SPEC = {
    **_SEEDS,
    "min_size": (0, 100000, None, "drop objects smaller than this (pixels)"),
    "nms_threshold": (0.0, 1.0, 0.05, "drop a mask overlapping a better one more than this"),
    "batch_size": (1, 1024, None, "prompts decoded together (memory vs speed)"),
    "multimasking": (None, None, None, "let SAM choose the best of three masks per prompt"),
    "intersection_over_min": (None, None, None, "overlap measured over the smaller mask, not the union"),
    "refine_with_box_prompts": (None, None, None, "decode again with boxes around the first masks"),
}
LINK_IOU = (0.25, 0.01, 1.0, 0.05, "stack: objects of neighbouring slices overlapping this much share an id")
