"""Pure-PyTorch Segment Anything models (no numpy I/O, no napari, no Qt)."""

from .config import MODEL_CONFIGS, SamConfig, TinyViTConfig, ViTConfig, build_model, get_config
from .sam import Sam

__all__ = [
    "MODEL_CONFIGS",
    "Sam",
    "SamConfig",
    "TinyViTConfig",
    "ViTConfig",
    "build_model",
    "get_config",
]
