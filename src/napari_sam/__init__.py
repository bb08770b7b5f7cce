"""napari-sam: Segment Anything (SAM, MobileSAM) for microscopy in napari.

Scripting entry points::

    from napari_sam import build_sam, SamPredictor
    predictor = SamPredictor(build_sam("vit_t"))
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-sam")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

from .engine import EmbeddingStore, ImageEmbedding, SamPredictor, build_sam, interpolate, propagate
from .engine.automatic import SamAutomaticMaskGenerator
from .model.checkpoint import CheckpointError
from .engine.weights import CheckpointDownloadError

__all__ = [
    "CheckpointDownloadError",
    "CheckpointError",
    "EmbeddingStore",
    "ImageEmbedding",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "__version__",
    "build_sam",
    "interpolate",
    "propagate",
]
