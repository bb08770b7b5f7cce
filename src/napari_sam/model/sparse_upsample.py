"""Thresholded full-resolution masks from low-res logits, interpolating only where needed.

SAM's masks are ``bilinear(low_res, (S, S))[:h, :w] > t``: a 4x bilinear upsampling of
(h_low, w_low) logits followed by a crop to the resized input. Each output pixel is a
convex combination of the low-res cells next to it (at 4x, output pixel ``y`` reads cells
``floor((y + 0.5) / 4 - 0.5)`` and the one after, clamped), so a tile of output pixels can
only be above ``t`` where some cell of its low-res support is, and is surely above (or
surely not above) ``t`` where every cell of its support is, by more than float rounding
could move a convex combination. Only the tiles whose support straddles a threshold are
interpolated, with the same ``F.interpolate`` call on a window of cells with a one-cell
halo: the windows start and end on the same cells, with the same (dyadic, exactly
representable) source coordinates, so their pixels are the very values of the full call
(checked once per device: where a kernel rounds windows differently, the full path runs).
The thresholded masks are bit-identical to the full computation.

Where the second step of ``postprocess_masks`` (crop -> original size) is needed, or most
tiles straddle a threshold, the full computation runs instead (same result).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: low-res cells per tile side: a tile is 4 * TILE output pixels square. Its window of
#: TILE + 2 cells gives 4 * (TILE + 2) = 72 pixels per side: PyTorch's CPU kernel switches
#: to another algorithm (other rounding) for outputs with height + width <= 128
TILE = 16
#: interpolating windows pays only while fewer tiles than this fraction straddle a threshold
MAX_MIXED_FRACTION = 0.5
#: |error| of a 4-term convex combination in float32 is a few ulp of the largest term:
#: tiles closer than this (relative) margin to a threshold are computed, never guessed
RELATIVE_MARGIN = 1e-5


def full_resolution_logits(
    low_res: Tensor, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> Tensor:
    """(B, K, h, w) low-res logits -> (B, K, H, W) float logits at the original size.

    The reference's two bilinear steps: up to the padded input (S, S), crop the padding
    away, then to the original size (skipped when it is the identity).
    """
    s = image_size
    masks = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    if tuple(input_size) != tuple(original_size):
        masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
    return masks


def thresholded_masks(
    low_res: Tensor,
    image_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    thresholds: Sequence[float],
) -> list[Tensor]:
    """``full_resolution_logits(...) > t`` for each ``t`` in ``thresholds``, bit-identical,
    computing logits only in the tiles that need them.

    Args:
        low_res: (B, K, h, w) float logits, with ``S == 4 * h == 4 * w``.
        image_size: S, side of the padded model input.
        input_size: (h_in, w_in) of the resized image inside the (S, S) input.
        original_size: (H, W) of the image.
        thresholds: logit thresholds.
    Returns:
        one (B, K, H, W) bool tensor per threshold.
    """
    b, k, h_low, w_low = low_res.shape
    h_in, w_in = (int(v) for v in input_size)
    sparse_ok = (
        tuple(input_size) == tuple(original_size)
        and 4 * h_low == image_size == 4 * w_low
        and min(h_low, w_low) >= TILE + 2
        and low_res.dtype == torch.float32
        and b * k > 0
        and _windows_are_exact(low_res.device)
    )
    if sparse_ok:
        masks = _sparse(low_res.reshape(b * k, h_low, w_low), (h_in, w_in), thresholds)
        if masks is not None:
            return [m.reshape(b, k, h_in, w_in) for m in masks]
    logits = full_resolution_logits(low_res, image_size, input_size, original_size)
    return [logits > t for t in thresholds]


def _sparse(
    low_res: Tensor, input_size: tuple[int, int], thresholds: Sequence[float]
) -> list[Tensor] | None:
    """(N, h, w) logits -> one (N, h_in, w_in) bool per threshold; None when too many tiles
    straddle a threshold for windows to pay."""
    n = low_res.shape[0]
    h_in, w_in = input_size
    # tiles covering the cropped output: (ty, tx) = ceil(h_in / 4T), ceil(w_in / 4T)
    ty, tx = -(-h_in // (4 * TILE)), -(-w_in // (4 * TILE))
    # per tile, min and max over its support: its cells and one cell around (clipped)
    x = low_res[:, None]  # (N, 1, h, w)
    pool = {"kernel_size": TILE + 2, "stride": TILE, "padding": 1, "ceil_mode": True}
    hi = F.max_pool2d(x, **pool)[:, 0, :ty, :tx]  # (N, ty, tx)
    lo = -F.max_pool2d(-x, **pool)[:, 0, :ty, :tx]
    scale = torch.maximum(hi.amax(dim=(1, 2)), -lo.amin(dim=(1, 2))).reshape(n, 1, 1)  # max |logit| (N, 1, 1)
    above, mixed = [], torch.zeros_like(hi, dtype=torch.bool)
    for t in thresholds:
        margin = RELATIVE_MARGIN * (scale + abs(t)) + 1e-30
        surely_above = lo > t + margin
        surely_not = hi < t - margin
        above.append(surely_above)
        mixed |= ~(surely_above | surely_not)
    which = mixed.nonzero()  # (M, 3): mask, tile row, tile column
    if len(which) > MAX_MIXED_FRACTION * mixed.numel():
        return None

    side = 4 * TILE
    outs = [torch.empty(n, ty, side, tx, side, dtype=torch.bool, device=low_res.device) for _ in thresholds]
    for out, sure in zip(outs, above):
        out.copy_(sure[:, :, None, :, None].expand_as(out))
    if len(which):
        exact = _interpolate_tiles(low_res, which[:, 0], which[:, 1], which[:, 2])  # (M, 4T, 4T)
        for out, t in zip(outs, thresholds):
            out[which[:, 0], which[:, 1], :, which[:, 2], :] = exact > t
    results = []
    for out in outs:
        full = out.reshape(n, ty * side, tx * side)
        if full.shape[1:] != (h_in, w_in):
            full = full[:, :h_in, :w_in].contiguous()
        results.append(full)
    return results


@functools.cache
def _windows_are_exact(device: torch.device) -> bool:
    """Whether this device's bilinear kernel gives a window's interior the very values of
    the full call (true of PyTorch's CPU kernel for outputs over 128 pixels high + wide)."""
    low = torch.randn(2, 1, 4 * TILE, 4 * TILE, generator=torch.Generator().manual_seed(0)).to(device)
    size = 16 * TILE
    full = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[:, 0]
    tiles = torch.tensor([0, 1, 2, 3], device=device)
    masks, rows, cols = tiles % 2, tiles // 2, tiles.flip(0) % 4
    exact = _interpolate_tiles(low[:, 0], masks, rows, cols)
    side = 4 * TILE
    expected = [full[m, r * side : (r + 1) * side, c * side : (c + 1) * side] for m, r, c in zip(masks, rows, cols)]
    return bool(torch.equal(exact, torch.stack(expected)))


def _interpolate_tiles(low_res: Tensor, mask: Tensor, tile_row: Tensor, tile_col: Tensor) -> Tensor:
    """Exact 4x bilinear logits of M tiles -> (M, 4T, 4T).

    Each tile is interpolated in a window of T + 2 cells per axis that contains its cells,
    at least one neighbour on each side where the grid has one, and that starts at 0 /
    ends at the grid's end where it touches them: so every output pixel of the tile reads
    the same cells with the same weights (and the same edge clamping) as in the full call.
    """
    _, h_low, w_low = low_res.shape
    span = TILE + 2
    steps = torch.arange(span, device=low_res.device)

    def window(tile: Tensor, n_low: int) -> tuple[Tensor, Tensor]:
        first = tile * TILE  # first cell of the tile
        start = (first - 1).clamp(0, n_low - span)  # (M,) first cell of the window
        return start[:, None] + steps, 4 * (first - start)  # (M, span) cells, (M,) offset

    rows, row_offset = window(tile_row, h_low)
    cols, col_offset = window(tile_col, w_low)
    # (M, span, span) windows gathered by flat index (much faster than 3-tensor indexing)
    flat = (mask[:, None, None] * h_low + rows[:, :, None]) * w_low + cols[:, None, :]
    windows = low_res.reshape(-1)[flat.reshape(-1)].reshape(flat.shape)
    up = F.interpolate(windows[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0]
    m, side = len(up), torch.arange(4 * TILE, device=low_res.device)
    # a tile past the grid's end (a partial last tile) reads clamped pixels it never keeps
    out_rows = (row_offset[:, None] + side).clamp(max=4 * span - 1)  # (M, 4T)
    out_cols = (col_offset[:, None] + side).clamp(max=4 * span - 1)
    up = up.gather(1, out_rows[:, :, None].expand(m, 4 * TILE, 4 * span))  # (M, 4T, 4 span)
    return up.gather(2, out_cols[:, None, :].expand(m, 4 * TILE, 4 * TILE))  # (M, 4T, 4T)
