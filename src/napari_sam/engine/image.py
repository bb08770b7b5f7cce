"""Turning microscopy images of any common dtype into SAM's 8-bit RGB input, and resizing.

SAM was trained on 8-bit RGB photographs. Every input is mapped to (H, W, 3) uint8:

* uint8 images without contrast limits pass through unchanged (exact parity with the
  reference predictor for RGB photographs);
* with ``contrast_limits=(lo, hi)`` values are mapped linearly so lo -> 0 and hi -> 255,
  clipped (this is what napari shows when the user sets the contrast);
* otherwise (uint16, int, float…) a robust normalisation: the 0.5th and 99.5th percentiles
  of the finite values become 0 and 255, so a few hot pixels do not wash the image out;
* bool images become 0 / 255; NaN and ±inf become 0 after normalisation;
* grayscale is repeated into three channels, an alpha channel is dropped.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

ROBUST_PERCENTILES = (0.5, 99.5)


def to_rgb_uint8(
    image: np.ndarray, contrast_limits: tuple[float, float] | None = None
) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any real dtype -> (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3] if image.shape[-1] == 4 else image
    elif image.ndim != 2:
        raise ValueError(
            "expected a 2D image (H, W) or (H, W, C) with C in 1, 3, 4, "
            f"got an array of shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"expected a real-valued image (int, float or bool), got {image.dtype}")

    if image.dtype == np.uint8 and contrast_limits is None:
        scaled = image
    else:
        scaled = _rescale_to_uint8(image, contrast_limits)
    if scaled.ndim == 2:
        scaled = scaled[..., None]
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return np.ascontiguousarray(scaled)


def _rescale_to_uint8(image: np.ndarray, contrast_limits: tuple[float, float] | None) -> np.ndarray:
    values = image.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError("expected an image with at least one finite value, got all NaN/inf")
    if contrast_limits is not None:
        lo, hi = (float(v) for v in contrast_limits)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(f"expected contrast_limits (low, high) with low <= high, got {contrast_limits}")
    else:
        sample = values[finite] if not finite.all() else values.ravel()
        if sample.size > 4_000_000:  # percentiles of a 2 M sample are as robust and faster
            sample = sample[:: sample.size // 2_000_000]
        lo, hi = (float(v) for v in np.percentile(sample, ROBUST_PERCENTILES))
        if hi <= lo:  # (nearly) constant image: use the full range it has
            lo, hi = float(sample.min()), float(sample.max())
    span = hi - lo
    if span <= 0:
        out = np.zeros(values.shape, dtype=np.uint8)
        out[finite & (values > lo)] = 255
        return out
    out = (values - lo) * (255.0 / span)
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
    return np.rint(out).astype(np.uint8)


def robust_limits(values: np.ndarray, what: str = "an image") -> tuple[float, float]:
    """(low, high) = the :data:`ROBUST_PERCENTILES` of the finite ``values`` (any shape);
    the full range when those coincide (a nearly constant image). ``what`` names the data
    in the error raised when no value is finite."""
    values = np.asarray(values, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"expected {what} with finite values, got only NaN/inf")
    lo, hi = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``long_side``, rounded as the reference."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def require_resizable(image_hw: tuple[int, int], long_side: int) -> None:
    """Raise a ValueError when an (H, W) image cannot be resized to the model's input: its
    short side would round to 0 pixels once the long side is ``long_side``."""
    height, width = (int(v) for v in image_hw[:2])
    if height < 1 or width < 1:
        raise ValueError(f"expected a non-empty image, got shape {tuple(image_hw)}")
    new_h, new_w = resized_shape(height, width, long_side)
    if new_h < 1 or new_w < 1:
        need = math.ceil(max(height, width) / (2 * long_side))
        raise ValueError(
            f"expected an image that can be resized to the model's input size {long_side} "
            f"(longest side), got shape ({height}, {width}): it is too thin, its short side "
            f"would become {min(new_h, new_w)} pixels. The short side must be at least "
            f"{need} pixels for this long side; crop or pad the image to a less elongated shape."
        )


class ResizeLongestSide:
    """Resize images and map coordinates so the longest side is ``target_length``.

    Same methods and results as ``segment_anything.utils.transforms.ResizeLongestSide``
    (public as ``napari_sam.utils.transforms.ResizeLongestSide``): images are resized with
    PIL's bilinear filter, coordinates are (x, y), sizes are (H, W).
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(h, w) of an (oldh, oldw) image once its longest side is ``long_side_length``."""
        return resized_shape(oldh, oldw, long_side_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8 with max(h, w) == target_length.

        (H, W) and (H, W, 1) uint8 become (h, w), as in the reference.
        """
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        require_resizable(image.shape[:2], self.target_length)
        h, w = resized_shape(image.shape[0], image.shape[1], self.target_length)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_image_torch(self, image):
        """(B, C, H, W) float tensor -> resized with antialiased bilinear interpolation.

        The output size is the reference's, which computes it from the *first two* sizes
        of the tensor, ``get_preprocess_shape(B, C, target_length)``: a (1, 1, H, W) input
        becomes (1, 1, S, S) whatever H and W (micro-sam's mask prompts rely on this). Kept
        so that results equal the reference's; for an aspect-preserving resize of an
        (B, C, H, W) tensor, call ``torch.nn.functional.interpolate`` with
        ``get_preprocess_shape(H, W, S)``.
        """
        import torch.nn.functional as F

        size = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def _scale(self, original_size: tuple[int, int]) -> tuple[float, float]:
        old_h, old_w = original_size
        new_h, new_w = resized_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h

    def apply_coords(self, coords_xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) in original pixels -> (x, y) in resized pixels (float)."""
        sx, sy = self._scale(original_size)
        coords = np.array(coords_xy, dtype=float, copy=True)
        coords[..., 0] *= sx
        coords[..., 1] *= sy
        return coords

    def apply_boxes(self, boxes_xyxy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 4) xyxy in original pixels -> (N, 4) in resized pixels."""
        corners = self.apply_coords(np.asarray(boxes_xyxy).reshape(-1, 2, 2), original_size)
        return corners.reshape(-1, 4)

    def apply_coords_torch(self, coords_xy, original_size: tuple[int, int]):
        """Torch version of :meth:`apply_coords`."""
        sx, sy = self._scale(original_size)
        coords = coords_xy.clone().float()
        coords[..., 0] *= sx
        coords[..., 1] *= sy
        return coords

    def apply_boxes_torch(self, boxes_xyxy, original_size: tuple[int, int]):
        """Torch version of :meth:`apply_boxes`."""
        return self.apply_coords_torch(boxes_xyxy.reshape(-1, 2, 2), original_size).reshape(-1, 4)
