"""The embeddings of an image layer's planes along one stack axis, through a session's
cache: :class:`SliceEmbeddings` (volume propagation, Segment Everything on stacks)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..engine import EmbeddingKey, ImageEmbedding
from .geometry import SlicePlane, base_data, plane_pixels

if TYPE_CHECKING:
    from .session import SamSession

class SliceEmbeddings:
    """The embeddings of ``layer``'s planes along one stack axis, through a session's cache.

    It is the ``embeddings`` argument of :func:`napari_sam.engine.volume.propagate`:
    ``len()``, ``embedding(i)`` (cached, or encoded on demand — blocking, fine in a
    worker thread) and ``original_size`` (H, W). Build it on the GUI thread.

    Args:
        session: the :class:`SamSession`.
        layer: the image layer.
        plane: any plane of the family (e.g. the shown one); its displayed axes are kept.
        axis: the data axis to walk (default: the first non-displayed axis).
    """

    def __init__(self, session: SamSession, layer, plane: SlicePlane, axis: int | None = None) -> None:
        hidden = [a for a in range(plane.ndim) if a not in plane.axes_rc]
        if axis is None:
            if not hidden:
                raise ValueError("expected a layer with a stack axis, got a 2D image")
            axis = hidden[0]
        if axis not in hidden:
            raise ValueError(f"expected a non-displayed axis among {hidden}, got {axis}")
        self.session, self.layer, self.template, self.axis = session, layer, plane, axis
        self.original_size = plane.shape_hw
        # what the worker thread needs, read here on the GUI thread (never the layer later)
        self._key = session.key_for(layer, plane)
        self._data, self._store = base_data(layer), session.store_for(layer)
        self._length = int(self._data.shape[axis])

    def __len__(self) -> int:
        return self._length

    def plane(self, i: int) -> SlicePlane:
        index = list(self.template.index)
        index[self.axis] = int(i)
        return SlicePlane(self.template.axes_rc, tuple(index), self.template.shape_hw)

    def key(self, i: int) -> EmbeddingKey:
        """The cache key of slice ``i`` (as captured when this object was made)."""
        return dataclasses.replace(self._key, index=self.plane(i).index)

    def image(self, i: int):
        """The pixels of slice ``i`` (H, W) or (H, W, C) (reads that slice only)."""
        return plane_pixels(self._data, self.plane(i))

    def embedding(self, i: int) -> ImageEmbedding:
        """Slice ``i``'s embedding: cached, stored, or encoded now (blocking; any thread)."""
        return self.session._cached_or_encoded(self._data, self.plane(i), self.key(i), self._store)
