"""numpy in, numpy out: predictor, normalisation, weights, devices (no napari, no Qt)."""

from .build import build_sam
from .cache import EmbeddingCache, EmbeddingKey
from .device import choose_device, choose_precision
from .predictor import ImageEmbedding, SamPredictor
from .weights import CHECKPOINTS, CheckpointDownloadError, cache_dir, fetch_checkpoint

__all__ = [
    "CHECKPOINTS",
    "EmbeddingCache",
    "EmbeddingKey",
    "CheckpointDownloadError",
    "ImageEmbedding",
    "SamPredictor",
    "build_sam",
    "cache_dir",
    "choose_device",
    "choose_precision",
    "fetch_checkpoint",
]
