"""A bounded in-memory cache of image embeddings with explicit keys."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from .predictor import ImageEmbedding


@dataclass(frozen=True)
class EmbeddingKey:
    """What an embedding depends on.

    Attributes:
        source: identifies the image data (e.g. napari layer id, or a data hash).
        index: the slice of the non-displayed axes, () for a 2D image.
        model_signature: ``Sam.signature`` (model type + checkpoint hash).
        normalisation: how pixels were mapped to 8 bit (e.g. contrast limits), as a tuple.
    """

    source: Hashable
    index: tuple[int, ...]
    model_signature: str
    normalisation: tuple = ()


class EmbeddingCache:
    """LRU cache ``EmbeddingKey -> ImageEmbedding`` holding at most ``max_items`` entries.

    A 1024² SAM embedding is 4 MiB (256 x 64 x 64 float32). Thread-safe.
    """

    def __init__(self, max_items: int = 32) -> None:
        if max_items < 1:
            raise ValueError(f"expected max_items >= 1, got {max_items}")
        self._items: OrderedDict[EmbeddingKey, ImageEmbedding] = OrderedDict()
        self._max = max_items
        self._lock = threading.Lock()

    @property
    def max_items(self) -> int:
        return self._max

    @max_items.setter
    def max_items(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"expected max_items >= 1, got {value}")
        with self._lock:
            self._max = value
            self._evict()

    def get(self, key: EmbeddingKey) -> ImageEmbedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: EmbeddingKey, embedding: ImageEmbedding) -> None:
        with self._lock:
            self._items[key] = embedding
            self._items.move_to_end(key)
            self._evict()

    def invalidate(self, source: Hashable | None = None, model_signature: str | None = None) -> int:
        """Drop entries of one image source and/or one model; returns how many were dropped."""
        with self._lock:
            doomed = [
                k
                for k in self._items
                if (source is None or k.source == source)
                and (model_signature is None or k.model_signature == model_signature)
            ]
            for k in doomed:
                del self._items[k]
            return len(doomed)

    def keys(self) -> list[EmbeddingKey]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: EmbeddingKey) -> bool:
        return key in self._items

    def _evict(self) -> None:
        while len(self._items) > self._max:
            self._items.popitem(last=False)
