"""Automatic instance segmentation (AIS) from decoder outputs, as micro-sam computes it.

micro-sam's instance decoder predicts three (H, W) maps in [0, 1] per image: the foreground
probability, the (normalised) distance to each object's centre and the (inverted, normalised)
distance to each object's boundary. :func:`instances_from_decoder_outputs` turns them into an
instance label image the way ``micro_sam.instance_segmentation.InstanceSegmentationWithDecoder
.generate`` does, with scipy / scikit-image only. :func:`seed_markers` is the seed step alone,
shared with the automatic prompt generator (APG).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["seed_markers"]

# 4-connectivity (connectivity=1) and 8-connectivity (connectivity=2) structuring elements.
_STRUCTURES = {
    1: ndimage.generate_binary_structure(2, 1),
    2: ndimage.generate_binary_structure(2, 2),
}


def _check_maps(**maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return the maps as float arrays after checking they are 2D, equal in shape and finite."""
    arrays = []
    shape = None
    for name, value in maps.items():
        array = np.asarray(value)
        if array.ndim != 2:
            raise ValueError(f"expected {name} of shape (H, W), got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
                or array.dtype == bool):
            raise ValueError(f"expected {name} of a real dtype, got dtype {array.dtype}")
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise ValueError(f"expected {name} of shape {shape} like the first map, got {array.shape}")
        if array.size and not np.isfinite(array).all():
            raise ValueError(f"expected finite values in {name}, got NaN or inf")
        arrays.append(array)
    return tuple(arrays)


def _check_threshold(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"expected {name} to be a number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"expected {name} in [0, 1], got {value}")


def seed_markers(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    *,
    foreground_threshold: float = 0.5,
    center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
    connectivity: int = 2,
    foreground_inclusive: bool = False,
) -> np.ndarray:
    """Label the seeds: connected components of (centre < t_c) & (boundary < t_b) & foreground.

    Args:
        foreground: (H, W) float in [0, 1], foreground probability.
        center_distances: (H, W) float in [0, 1], distance to the object centre (low = centre).
        boundary_distances: (H, W) float in [0, 1], inverted distance to the object boundary
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
        foreground=foreground, center_distances=center_distances, boundary_distances=boundary_distances
    )
    _check_threshold("foreground_threshold", foreground_threshold)
    _check_threshold("center_distance_threshold", center_distance_threshold)
    _check_threshold("boundary_distance_threshold", boundary_distance_threshold)
    if connectivity not in _STRUCTURES:
        raise ValueError(f"expected connectivity 1 or 2, got {connectivity!r}")
    if foreground_inclusive:
        seeds = foreground >= foreground_threshold
    else:
        seeds = foreground > foreground_threshold
    seeds &= center_distances < center_distance_threshold
    seeds &= boundary_distances < boundary_distance_threshold
    labels, _ = ndimage.label(seeds, structure=_STRUCTURES[connectivity], output=np.int32)
    return labels
