"""Make the reference packages (segment-anything, mobilesam-mirror) importable here.

The PyPI torchvision wheel that matches torch 2.13.0 is a CUDA build: importing it on a
CPU-only torch fails because its C++ operators (``torchvision::nms`` and friends) are not
registered. The reference code only needs ``nms`` (through ``batched_nms``), ``box_area``
and the PIL-based ``resize``/``to_pil_image``, all of which are pure Python except ``nms``.
So before the first import we declare the operator schemas torchvision checks for, and
give ``nms`` a CPU kernel written in plain torch (greedy NMS, same rule as torchvision:
drop a box whose IoU with a kept, higher-scoring box is strictly greater than the threshold).

Test-only: nothing in ``src/`` imports this.
"""

from __future__ import annotations

import torch

_LIBRARY = None


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes: (N, 4) xyxy; scores: (N,). Returns kept indices (K,) int64, best first."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def install() -> None:
    """Register the torchvision operator schemas the wheel expects (idempotent)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    try:
        torch.ops.torchvision.nms  # already there (a real CPU torchvision)
        _LIBRARY = True
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    lib.impl("nms", _greedy_nms, "CPU")
    _LIBRARY = lib


def _enable_torchvision_ops() -> None:
    """torchvision gates ``nms`` on its C++ library having loaded; ours is registered above."""
    import torchvision.extension

    torchvision.extension._has_ops = lambda: True


def import_segment_anything():
    """Return the reference ``segment_anything`` module (skips the test if absent)."""
    import pytest

    install()
    module = pytest.importorskip("segment_anything")
    _enable_torchvision_ops()
    return module


def import_mobile_sam():
    """Return the reference ``mobile_sam`` module (skips the test if absent)."""
    import pytest

    install()
    module = pytest.importorskip("mobile_sam")
    _enable_torchvision_ops()
    return module
