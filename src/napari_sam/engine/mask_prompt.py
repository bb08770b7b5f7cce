"""An image-space mask -> SAM's ``mask_input`` (low-res prompt logits): one conversion for
every caller (the widget's refine, propagation's start slice, interpolation's ends), so a
mask is the same prompt wherever it is given.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MASK_LOGIT = 8.0
"""Logit magnitude of a fully covered (+) or empty (-) low-res cell (see :func:`mask_to_logits`)."""


def mask_to_logits(mask_hw: np.ndarray, predictor) -> np.ndarray:
    """(H, W) bool mask of the predictor's current image -> (1, h, w) float32 prompt logits.

    Args:
        mask_hw: (H, W) bool (any dtype: non-zero = object), (row, col) pixels of the image given to
            ``set_image`` / of the current embedding: ``(H, W) == predictor.original_size``.
        predictor: a :class:`~napari_sam.engine.predictor.SamPredictor` with an image set
            (uses its ``original_size``, ``input_size``, ``low_res_size`` and
            ``model.image_size``).
    Returns:
        (1, h, w) float32 logits in [-MASK_LOGIT, +MASK_LOGIT] on the low-res grid,
        ``(h, w) == predictor.low_res_size`` (256 x 256 for SAM): ready as ``mask_input``
        of :meth:`SamPredictor.predict` (add a batch axis for ``predict_torch``).

    Geometry — the mask travels exactly like the image: resized so its longest side is
    the model input size S (``input_size`` (h_in, w_in), bilinear, antialiased when
    shrinking, as PIL resizes the image), padded at the bottom/right to (S, S), then each
    low-res cell gets the mean of its S/h x S/w block (area pooling): the fraction
    ``p`` of the cell the mask covers. The low-res grid is the padded frame's, so cells in
    the padding are empty and a non-square image keeps its aspect ratio.

    Values — ``MASK_LOGIT * (2 p - 1)``, linear in the covered fraction. SAM turns its
    low-res logits into a mask by upsampling them bilinearly (``postprocess_masks``) and
    thresholding at 0; upsampling a linear function of ``p`` and cutting at 0 is cutting
    the interpolated coverage at 1/2, so the prompt's border is where the mask's border
    was (measured: < 0.1 cell off for straight edges, against up to ~0.16 cell for
    inverse-sigmoid logits ``log(p / (1 - p))``, whose steep ends pull the zero crossing
    towards the partly covered cell). The magnitude is of the order of SAM's own low-res
    outputs for a confident object (one quoted in segment-anything issue #169 runs from
    about +5…+8 inside to -10…-20 outside) and matters little: SAM's mask encoder follows
    its first 2x2 convolution with a LayerNorm over channels, so in a saturated region
    the magnitude counts only against the convolution's bias, which it soon dominates.
    8 is what propagation used and benchmarked before this function existed; it was not
    tuned on real weights.

    Limits: structures thinner than about one low-res cell (S/h input pixels, 4 for SAM;
    divide by the resize scale for original pixels) may cover no cell by half and vanish,
    as they would in SAM's own low-res output.
    """
    mask = np.asarray(mask_hw)
    original = tuple(int(v) for v in predictor.original_size)
    if mask.shape != original:
        raise ValueError(f"expected a mask of shape {original} (the image's), got {mask.shape}")
    s = int(predictor.model.image_size)
    h_in, w_in = (int(v) for v in predictor.input_size)
    low_res = tuple(int(v) for v in predictor.low_res_size)
    t = torch.from_numpy((mask != 0).astype(np.float32))[None, None]  # (1, 1, H, W) in {0, 1}
    if (h_in, w_in) != original:
        # PIL-like bilinear (antialias=True matches PIL's filter support when shrinking);
        # its weights may sum to 1 + 1e-7: clamped below
        t = F.interpolate(t, (h_in, w_in), mode="bilinear", align_corners=False, antialias=True)
    t = F.pad(t.clamp(0, 1), (0, s - w_in, 0, s - h_in))  # (1, 1, S, S), padding empty
    cover = F.interpolate(t, low_res, mode="area")  # (1, 1, h, w): covered fraction p
    return (MASK_LOGIT * (2 * cover[0] - 1)).numpy().astype(np.float32)  # (1, h, w)
