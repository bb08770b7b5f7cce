"""numpy in, numpy out: predictor, normalisation, weights, devices, volumes (no napari, no Qt)."""

from .build import build_sam
from .cache import EmbeddingCache, EmbeddingKey
from .device import choose_device, choose_precision
from .mask_prompt import mask_to_logits
from .predictor import ImageEmbedding, SamPredictor, full_res_masks
from .stack import VolumeEmbeddings
from .store import (
    EmbeddingStore,
    StoreError,
    StoreMismatchError,
    StoreStatus,
    StoreWriteError,
    read_store_info,
)
from .volume import PromptStrategy, PropagationResult, interpolate, propagate, run_generator
from .weights import CHECKPOINTS, CheckpointDownloadError, cache_dir, fetch_checkpoint

__all__ = [
    "CHECKPOINTS",
    "CheckpointDownloadError",
    "EmbeddingCache",
    "EmbeddingKey",
    "EmbeddingStore",
    "ImageEmbedding",
    "PromptStrategy",
    "PropagationResult",
    "SamPredictor",
    "StoreError",
    "StoreMismatchError",
    "StoreStatus",
    "StoreWriteError",
    "VolumeEmbeddings",
    "build_sam",
    "cache_dir",
    "choose_device",
    "choose_precision",
    "fetch_checkpoint",
    "full_res_masks",
    "interpolate",
    "mask_to_logits",
    "propagate",
    "read_store_info",
    "run_generator",
]
