"""Automatic instance segmentation (AIS) from decoder outputs, as micro-sam computes it.

micro-sam's instance decoder predicts three (H, W) maps in [0, 1]: the foreground probability,
the normalised distance to each object's centre and the inverted, normalised distance to each
object's boundary. :func:`instances_from_decoder_outputs` turns them into an instance label
image as ``micro_sam.instance_segmentation.InstanceSegmentationWithDecoder.generate`` does
(torch_em's ``watershed_from_center_and_boundary_distances``, bioimage_cpp's filters,
labelling and watershed), with numpy, scipy and scikit-image only:

1. Gaussian smoothing of the foreground (sigma ``foreground_smoothing``) and of both distance
   maps (sigma ``distance_smoothing``): a sampled Gaussian normalised to sum 1, radius
   ``ceil(3 * sigma)``, mirror border (``d c b | a b c d | c b a``), float32 — the kernel of
   bioimage_cpp's (vigra/fastfilters-style) ``gaussian_smoothing``.
2. Seeds: 8-connected components of ``centre < t_c & boundary < t_b & foreground > t_f``
   (:func:`seed_markers`).
3. Seeded watershed (Meyer flooding, 4-connectivity, no compactness) of the smoothed
   boundary distances inside ``foreground > t_f``; foreground not reachable from a seed stays 0.
4. ``min_size > 0``: objects with fewer pixels are removed (set to 0, not merged into a
   neighbour) and the ids are made consecutive again, in their old order.

Our watershed needs no priority queue (:func:`.watershed.seeded_watershed`) and equals scikit-image's
``watershed`` pixel for pixel, up to ties between equal heights. micro-sam's (bioimage_cpp)
quantises heights to 16 bits and floods each level last-in-first-out, so a pixel between
two basins whose lowest neighbours share a 16-bit level may go the other way: in tests
99.75-100% of the pixels agree, same instances (tests/test_ais_postprocess.py). Output ids
are the same as micro-sam's (row-major order of the seeds), uint32 instead of uint64.
:func:`seed_markers` alone is shared with the automatic prompt generator (APG).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from .automatic_params import _is_real
from .watershed import seeded_watershed

__all__ = ["AisParameters", "instances_from_decoder_outputs", "seed_markers", "smooth"]

# 4-connectivity (connectivity=1) and 8-connectivity (connectivity=2) structuring elements.
_STRUCTURES = {
    1: ndimage.generate_binary_structure(2, 1),
    2: ndimage.generate_binary_structure(2, 2),
}


@dataclass(frozen=True)
class AisParameters:
    """Post-processing parameters of micro-sam's AIS, with micro-sam's defaults.

    Attributes:
        center_distance_threshold: seeds need smoothed centre distance < this, in [0, 1].
        boundary_distance_threshold: seeds need smoothed boundary distance < this, in [0, 1].
        foreground_threshold: foreground is smoothed foreground > this, in [0, 1].
        foreground_smoothing: Gaussian sigma (pixels) for the foreground; 0 = none.
        distance_smoothing: Gaussian sigma (pixels) for both distance maps; 0 = none.
        min_size: objects with fewer pixels are removed; 0 = keep all.
    """

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0

    def validate(self) -> AisParameters:
        """Raise ValueError on an out-of-range value; return self (for chaining)."""
        for name in ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold"):
            _check_threshold(name, getattr(self, name))
        for name in ("foreground_smoothing", "distance_smoothing"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"expected {name} a finite number >= 0, got {value!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, numbers.Integral) or self.min_size < 0:
            raise ValueError(f"expected min_size an integer >= 0, got {self.min_size!r}")
        return self

    def as_kwargs(self) -> dict[str, float | int]:
        """The six values by name, for ``instances_from_decoder_outputs(..., **p.as_kwargs())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_DEFAULTS = AisParameters()


def _check_threshold(name: str, value: object) -> None:
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"expected {name} a number in [0, 1], got {value!r}")


def _check_maps(unit_range: bool, **maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """The maps as float32 arrays, after checking they are real, 2D, of one shape, finite
    (and in [0, 1] when ``unit_range``)."""
    arrays = []
    shape = None
    for name, value in maps.items():
        array = np.asarray(value)
        if array.ndim != 2:
            raise ValueError(f"expected {name} of shape (H, W), got shape {array.shape}")
        if array.dtype.kind not in "fiub":
            raise ValueError(f"expected {name} of a real dtype, got dtype {array.dtype}")
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise ValueError(f"expected {name} of shape {shape} like the first map, got {array.shape}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.size:
            low, high = float(array.min()), float(array.max())  # NaN propagates into both
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"expected finite values in {name}, got NaN or inf")
            if unit_range and not (0.0 <= low and high <= 1.0):
                raise ValueError(f"expected {name} in [0, 1], got values in [{low:g}, {high:g}]")
        arrays.append(array)
    return tuple(arrays)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """(2r + 1,) float32 sampled Gaussian, r = ceil(3 sigma), normalised to sum 1."""
    radius = math.ceil(3.0 * sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def smooth(image: np.ndarray, sigma: float, *, rows_per_block: int = 64) -> np.ndarray:
    """Gaussian smoothing with bioimage_cpp's / vigra's kernel and border.

    Args:
        image: (H, W) float32.
        sigma: > 0, pixels. Kernel: sampled Gaussian with radius ``ceil(3 * sigma)``,
            normalised to sum 1 (not scipy's ``int(4 * sigma + 0.5)``); border: mirror
            without repeating the edge pixel (scipy's ``mode="mirror"``).
        rows_per_block: rows done at once, so the work stays in the CPU cache.

    Returns:
        (H, W) float32. Same result as ``scipy.ndimage.gaussian_filter(image, sigma,
        mode="mirror", truncate=ceil(3 * sigma) / sigma)`` within float32 rounding, about
        2x faster: the symmetric kernel is applied as ``w0 x + sum_j w_j (x[-j] + x[+j])``
        on cache-sized blocks.
    """
    if not _is_real(sigma) or not 0 < sigma < math.inf:
        raise ValueError(f"expected sigma a finite number > 0, got {sigma!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected image of shape (H, W), got shape {image.shape}")
    kernel = _gaussian_kernel(sigma)
    radius = (kernel.size - 1) // 2
    height, width = image.shape
    if radius >= min(height, width):  # tiny image: let scipy fold the mirror repeatedly
        return ndimage.gaussian_filter(
            image, sigma, mode="mirror", truncate=radius / sigma, output=np.float32
        )
    padded = np.pad(image, radius, mode="reflect")  # (H + 2r, W + 2r); numpy's reflect = mirror
    out = np.empty((height, width), np.float32)
    rows = min(rows_per_block, height)
    acc = np.empty((rows, width + 2 * radius), np.float32)
    tmp = np.empty_like(acc)
    for top in range(0, height, rows):
        n = min(rows, height - top)
        a, t = acc[:n], tmp[:n]
        centre = top + radius  # row of `padded` that holds image row `top`
        np.multiply(padded[centre:centre + n], kernel[radius], out=a)  # vertical pass
        for j in range(1, radius + 1):
            np.add(padded[centre - j:centre - j + n], padded[centre + j:centre + j + n], out=t)
            t *= kernel[radius + j]
            a += t
        o = out[top:top + n]
        np.multiply(a[:, radius:radius + width], kernel[radius], out=o)  # horizontal pass
        s = t[:, :width]
        for j in range(1, radius + 1):
            np.add(a[:, radius - j:radius - j + width], a[:, radius + j:radius + j + width], out=s)
            s *= kernel[radius + j]
            o += s
    return out


def seed_markers(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    *,
    foreground_threshold: float = _DEFAULTS.foreground_threshold,
    center_distance_threshold: float = _DEFAULTS.center_distance_threshold,
    boundary_distance_threshold: float = _DEFAULTS.boundary_distance_threshold,
    connectivity: int = 2,
    foreground_inclusive: bool = False,
) -> np.ndarray:
    """Label the seeds: connected components of (centre < t_c) & (boundary < t_b) & foreground.

    Args:
        foreground: (H, W) float, foreground probability.
        center_distances: (H, W) float, distance to the object centre (low = centre).
        boundary_distances: (H, W) float, inverted distance to the object boundary
            (low = far from the boundary).
        foreground_threshold: a pixel is foreground where ``foreground > foreground_threshold``
            (``>=`` with ``foreground_inclusive=True``).
        center_distance_threshold: seeds need ``center_distances < center_distance_threshold``.
        boundary_distance_threshold: seeds need ``boundary_distances < boundary_distance_threshold``.
        connectivity: 2 = 8-neighbourhood, 1 = 4-neighbourhood.
        foreground_inclusive: compare the foreground with ``>=`` instead of ``>``.

    micro-sam's two users differ: the AIS watershed (``generate`` of
    ``InstanceSegmentationWithDecoder``) labels with 8-connectivity and ``foreground > t`` on
    *smoothed* maps — the defaults here; the prompt generator (``_derive_point_prompts`` of
    ``AutomaticPromptGenerator``) labels the *raw* maps with 4-connectivity and treats
    ``foreground >= t`` as foreground — pass ``connectivity=1, foreground_inclusive=True``.
    (Its block-wise labelling may number components in a different order; the set of
    components is the same.)

    Returns:
        (H, W) int32 labels, 0 = no seed, seeds 1..N numbered in row-major order of their
        first pixel.
    """
    foreground, center_distances, boundary_distances = _check_maps(
        False, foreground=foreground, center_distances=center_distances,
        boundary_distances=boundary_distances,
    )
    _check_threshold("foreground_threshold", foreground_threshold)
    _check_threshold("center_distance_threshold", center_distance_threshold)
    _check_threshold("boundary_distance_threshold", boundary_distance_threshold)
    if connectivity not in _STRUCTURES:
        raise ValueError(f"expected connectivity 1 or 2, got {connectivity!r}")
    if foreground_inclusive:
        fg_mask = foreground >= foreground_threshold
    else:
        fg_mask = foreground > foreground_threshold
    return _label_seeds(
        fg_mask, center_distances, boundary_distances,
        center_distance_threshold, boundary_distance_threshold, connectivity,
    )


def _label_seeds(fg_mask, center_distances, boundary_distances, t_center, t_boundary, connectivity):
    seeds = center_distances < t_center
    seeds &= boundary_distances < t_boundary
    seeds &= fg_mask
    labels, _ = ndimage.label(seeds, structure=_STRUCTURES[connectivity], output=np.int32)
    return labels


def instances_from_decoder_outputs(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    *,
    center_distance_threshold: float = _DEFAULTS.center_distance_threshold,
    boundary_distance_threshold: float = _DEFAULTS.boundary_distance_threshold,
    foreground_threshold: float = _DEFAULTS.foreground_threshold,
    foreground_smoothing: float = _DEFAULTS.foreground_smoothing,
    distance_smoothing: float = _DEFAULTS.distance_smoothing,
    min_size: int = _DEFAULTS.min_size,
) -> np.ndarray:
    """Instance label image from AIS decoder outputs (micro-sam's ``generate`` semantics).

    Args:
        foreground: (H, W) float in [0, 1], foreground probability (decoder channel 0).
        center_distances: (H, W) float in [0, 1], normalised distance to the object centre
            (channel 1).
        boundary_distances: (H, W) float in [0, 1], inverted normalised distance to the
            object boundary (channel 2).
        center_distance_threshold, boundary_distance_threshold, foreground_threshold,
        foreground_smoothing, distance_smoothing, min_size: see :class:`AisParameters`
            (the defaults are micro-sam's).

    Returns:
        (H, W) uint32 labels: 0 = background, objects 1..N (consecutive; numbered in
        row-major order of the first pixel of their seed).

    Raises:
        ValueError: maps not 2D, of different shapes, not finite or outside [0, 1];
            parameters out of range.
    """
    params = AisParameters(
        center_distance_threshold=center_distance_threshold,
        boundary_distance_threshold=boundary_distance_threshold,
        foreground_threshold=foreground_threshold,
        foreground_smoothing=foreground_smoothing,
        distance_smoothing=distance_smoothing,
        min_size=min_size,
    ).validate()
    foreground, center_distances, boundary_distances = _check_maps(
        True, foreground=foreground, center_distances=center_distances,
        boundary_distances=boundary_distances,
    )
    if params.foreground_smoothing > 0:
        foreground = smooth(foreground, params.foreground_smoothing)
    if params.distance_smoothing > 0:
        center_distances = smooth(center_distances, params.distance_smoothing)
        boundary_distances = smooth(boundary_distances, params.distance_smoothing)
    fg_mask = foreground > params.foreground_threshold
    markers = _label_seeds(
        fg_mask, center_distances, boundary_distances,
        params.center_distance_threshold, params.boundary_distance_threshold, 2,
    )
    labels = seeded_watershed(boundary_distances, markers, fg_mask)
    if params.min_size > 0:
        labels = _remove_small(labels, params.min_size)
    return labels.view(np.uint32)  # ids >= 0: same bits


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than ``min_size`` pixels -> 0; the rest renumbered 1..M in order."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    new_ids = np.zeros(sizes.size, labels.dtype)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return new_ids[labels]
