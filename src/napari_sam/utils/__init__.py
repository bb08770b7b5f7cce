"""Counterpart of ``segment_anything.utils``: re-exports only (see :mod:`napari_sam.compat`)."""
