"""Test-only: synthetic cell label images and what a perfect AIS decoder would output for them.

Two functions, numpy and scipy/scikit-image only (no micro-sam needed):

* :func:`synthetic_cells` — a reproducible (H, W) label image of blob-like objects of varied
  size, some touching their neighbours, some isolated.
* :func:`decoder_targets_from_labels` — the three maps micro-sam's instance decoder is trained
  to predict for a label image (foreground, distance to the object centre, inverted distance
  to the object boundary), computed as micro-sam's training targets are: torch_em's
  ``PerObjectDistanceTransform(distances=True, boundary_distances=True,
  directed_distances=False, foreground=True)`` (micro_sam/training; its ``min_size``, which
  drops small objects first, is taken as 0: filter the labels beforehand). Feeding them to the AIS
  post-processing is an "oracle decoder"; tests/test_ais_postprocess.py checks they equal
  torch_em's transform where micro-sam is installed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries

_EPS = 1e-7  # torch_em's normalisation epsilon


def decoder_targets_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Perfect decoder outputs for a label image.

    Args:
        labels: (H, W) int, 0 = background. As in torch_em, every 8-connected piece of one id
            becomes its own object.

    Returns:
        ``(foreground, center_distances, boundary_distances)``, each (H, W) float32 in [0, 1]:
        foreground 1 inside objects, 0 outside; per object, the Euclidean distance to its
        centre (the rounded centroid, or the point farthest from the object's boundary when
        the centroid lies outside it) and the inverted distance to the nearest inner-boundary
        pixel (``max - d``), each divided by its maximum over the object (+1e-7); both
        distances are 1 on the background.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected labels (H, W) int, got shape {labels.shape} dtype {labels.dtype}")
    objects = connected_components(labels, background=0, connectivity=2)
    boundaries = find_boundaries(objects, mode="inner")
    center = np.ones(labels.shape, np.float32)
    boundary = np.ones(labels.shape, np.float32)
    for index, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        mask = objects[box] == index
        rows, cols = np.nonzero(mask)
        # Distance of each pixel of the box to the nearest boundary pixel inside the box.
        to_boundary = ndimage.distance_transform_edt(~boundaries[box])
        to_boundary[~mask] = 0
        peak = np.unravel_index(np.argmax(to_boundary), mask.shape)
        # The rounded centroid in image coordinates (torch_em: regionprops), then in the box.
        top, left = box[0].start, box[1].start
        centre = (int(np.round((rows + top).mean())) - top, int(np.round((cols + left).mean())) - left)
        if not mask[centre]:
            centre = peak
        yy, xx = np.indices(mask.shape)
        to_centre = np.hypot(yy - centre[0], xx - centre[1])
        inverted = to_boundary[peak] - to_boundary
        for out, value in ((center, to_centre), (boundary, inverted)):
            value = np.where(mask, value, 0.0)
            out[box][mask] = (value / (np.abs(value).max() + _EPS))[mask]
    foreground = (objects > 0).astype(np.float32)
    return foreground, center, boundary


def synthetic_cells(
    shape: tuple[int, int] = (256, 256),
    n: int = 40,
    seed: int = 0,
    *,
    radius: tuple[float, float] = (6.0, 16.0),
    min_area: int = 40,
) -> np.ndarray:
    """A label image of ``n`` blob-like cells (fewer where there is no room or some end up
    too small).

    Cells are ellipses with random radii in ``radius`` (pixels), elongation up to 1.4 and
    orientation; about half are placed touching an earlier cell, the rest anywhere, none
    closer than 0.78 x the sum of the long radii. Where ellipses overlap, each pixel goes
    to the cell it is relatively deepest in, so touching cells share a border; every cell
    keeps only its largest 4-connected piece, and cells under ``min_area`` pixels are dropped.

    Returns:
        (H, W) int32 labels, 0 = background, cells 1..N (N <= n), same output for the same
        arguments.
    """
    height, width = shape
    rng = np.random.default_rng(seed)
    depth = np.full(shape, 1.0)  # normalised ellipse radius of the owning cell (< 1 inside)
    labels = np.zeros(shape, np.int32)
    centres: list[tuple[float, float, float]] = []  # (y, x, long radius)
    index = 0
    for _ in range(20 * n):  # rejection sampling: cells overlap by at most ~25% of radii
        if index == n:
            break
        r = rng.uniform(*radius)
        elongation = rng.uniform(1.0, 1.4)
        if centres and rng.random() < 0.5:
            cy, cx, cr = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            gap = rng.uniform(0.8, 0.95) * (r * elongation + cr)
            y, x = cy + gap * np.sin(angle), cx + gap * np.cos(angle)
        else:
            y, x = rng.uniform(0, height), rng.uniform(0, width)
        if centres:
            placed = np.asarray(centres)
            near = np.hypot(placed[:, 0] - y, placed[:, 1] - x) < 0.78 * (placed[:, 2] + r * elongation)
            if near.any():
                continue
        centres.append((y, x, r * elongation))
        index += 1
        ry, rx = r * elongation, r
        theta = rng.uniform(0, np.pi)
        extent = int(np.ceil(max(ry, rx))) + 1
        y0, y1 = max(int(y) - extent, 0), min(int(y) + extent + 1, height)
        x0, x1 = max(int(x) - extent, 0), min(int(x) + extent + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - y, xx - x
        u = dy * np.cos(theta) + dx * np.sin(theta)
        v = -dy * np.sin(theta) + dx * np.cos(theta)
        d = np.sqrt((u / ry) ** 2 + (v / rx) ** 2)
        win = d < depth[y0:y1, x0:x1]
        depth[y0:y1, x0:x1][win] = d[win]
        labels[y0:y1, x0:x1][win] = index
    out = np.zeros(shape, np.int32)
    next_id = 1
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, count = ndimage.label(labels[box] == index)
        if count == 0:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        if sizes.max() < min_area:
            continue
        out[box][pieces == 1 + int(np.argmax(sizes))] = next_id
        next_id += 1
    return out
