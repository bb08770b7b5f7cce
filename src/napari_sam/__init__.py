"""napari-sam: Segment Anything (SAM, MobileSAM) for microscopy in napari.

Scripting entry points::

    from napari_sam import build_sam, SamPredictor, SamInstanceSegmenter
    predictor = SamPredictor(build_sam("vit_t"))
    labels = SamInstanceSegmenter(build_sam("vit_b_lm")).segment(image).labels  # AIS
    tiled = TiledPredictor(build_sam("vit_t")); tiled.set_image(big_image)  # large images

Code written for ``segment_anything`` runs with its imports changed (``sam_model_registry``,
``SamPredictor``, ``SamAutomaticMaskGenerator``, ``napari_sam.utils.transforms``): see
:mod:`napari_sam.compat` for what is covered.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-sam")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

# Imported on first use (PEP 562): ``napari-sam --help`` and Ctrl-C during start-up must not
# wait for torch; ``from napari_sam import build_sam`` works as usual.
_LAZY = {
    "AisParameters": ".engine.instance_segmentation",
    "ApgParameters": ".engine.prompt_generation",
    "CheckpointDownloadError": ".engine.weights",
    "CheckpointError": ".model.checkpoint",
    "EmbeddingStore": ".engine",
    "ImageEmbedding": ".engine",
    "InstanceSegmentation": ".engine.instances",
    "SamAutomaticMaskGenerator": ".engine.automatic",
    "SamInstanceSegmenter": ".engine.instances",
    "SamPredictor": ".engine",
    "TileGrid": ".engine.tiling",
    "TiledEmbedding": ".engine.tiled_predictor",
    "TiledPredictor": ".engine.tiled_predictor",
    "build_sam": ".engine",
    "build_sam_vit_b": ".compat",
    "build_sam_vit_h": ".compat",
    "build_sam_vit_l": ".compat",
    "build_sam_vit_t": ".compat",
    "interpolate": ".engine",
    "propagate": ".engine",
    "sam_model_registry": ".compat",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
