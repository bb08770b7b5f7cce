"""Pure-PyTorch Segment Anything models (no numpy I/O, no napari, no Qt)."""

from .config import MODEL_CONFIGS, SamConfig, TinyViTConfig, ViTConfig, build_model, get_config
from .instance_decoder import InstanceDecoder, decoder_from_state
from .sam import Sam

__all__ = [
    "MODEL_CONFIGS",
    "InstanceDecoder",
    "Sam",
    "SamConfig",
    "TinyViTConfig",
    "ViTConfig",
    "build_model",
    "decoder_from_state",
    "get_config",
]
