"""Counterpart of ``segment_anything.utils.transforms`` (see :mod:`napari_sam.compat`)."""

from ..compat import ResizeLongestSide

__all__ = ["ResizeLongestSide"]
