"""The ``segment_anything`` compatibility surface, in one place.

Scripts written for Meta's ``segment_anything`` (or MobileSAM's ``mobile_sam``) run with
only their import lines changed::

    from napari_sam import sam_model_registry, SamPredictor, SamAutomaticMaskGenerator
    from napari_sam.utils.transforms import ResizeLongestSide

What is covered, each tested against the reference on identical random weights
(``tests/test_dropin_*.py``: masks IoU >= 0.99, scores within 1e-4):

* ``sam_model_registry``: keys ``default`` (= ``vit_h``), ``vit_h``, ``vit_l``, ``vit_b``,
  ``vit_t`` (MobileSAM) and every other name of :data:`napari_sam.model.MODEL_CONFIGS`.
  ``sam_model_registry[name](checkpoint=None)`` builds the model as the reference does: in
  eval mode, float32 (no reduced precision), on the CPU (move it with ``.to(device)``), with
  the weights of ``checkpoint`` or, when it is None, randomly initialised (nothing is
  downloaded). ``build_sam_vit_h``, ``build_sam_vit_l``, ``build_sam_vit_b`` and
  ``build_sam_vit_t`` are the same builders. (Our own :func:`~napari_sam.build_sam`
  keeps its signature, ``build_sam(model_type, checkpoint, device, precision="auto")``,
  and may pick bf16 for speed; the reference's ``build_sam(checkpoint)`` is
  ``build_sam_vit_h`` here.)
* ``ResizeLongestSide`` (``napari_sam.utils.transforms``): ``apply_image``,
  ``apply_coords``, ``apply_boxes``, ``apply_image_torch``, ``apply_coords_torch``,
  ``apply_boxes_torch`` and the static ``get_preprocess_shape``, with the reference's
  results (including ``apply_image_torch`` taking its output size from the first two
  sizes of the tensor, as the reference does).
* ``Sam``: calling the model, ``sam(batched_input, multimask_output)``, takes and returns
  the reference's dicts (``image``, ``original_size``, ``point_coords``, ``point_labels``,
  ``boxes``, ``mask_inputs`` -> ``masks``, ``iou_predictions``, ``low_res_logits``);
  ``image_encoder``, ``prompt_encoder``, ``mask_decoder``, ``preprocess``,
  ``postprocess_masks``, ``device``, ``mask_threshold``, ``image_format``.
* ``SamPredictor``: ``set_image``, ``set_torch_image``, ``predict``, ``predict_torch``,
  ``get_image_embedding``, ``reset_image`` and the public attributes ``model``,
  ``transform``, ``device``, ``features`` (a plain tensor), ``original_size``,
  ``input_size``, ``orig_h``, ``orig_w``, ``input_h``, ``input_w``, ``is_image_set``.
  Precomputed features may be set directly (``predictor.features = …``,
  ``predictor.original_size = …``, ``predictor.input_size = …``) as micro-sam does.
* ``SamAutomaticMaskGenerator``: the reference's constructor, defaults and ``generate``
  records (``segmentation``, ``area``, ``bbox``, ``predicted_iou``, ``point_coords``,
  ``stability_score``, ``crop_box``), output modes ``binary_mask``,
  ``uncompressed_rle``, ``coco_rle``.

Known differences: checkpoints load with ``weights_only=True`` (files holding pickled code
are refused, see :mod:`napari_sam.model.checkpoint`); invalid input raises ``ValueError``
where the reference asserts; ``min_mask_region_area`` uses scikit-image, not OpenCV.
Automatic-mask records hold Python ints in ``bbox``/``crop_box`` always; the reference's
hold floats (the same whole numbers) when one of its crops produced no mask (an empty
float tensor concatenated with the others' int boxes), which happens with ``crop_n_layers
>= 1``. Code that writes them as text sees ``12`` where the reference wrote ``12.0``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .engine.build import build_sam
from .engine.image import ResizeLongestSide
from .model import MODEL_CONFIGS, Sam, SamConfig, build_model, get_config

__all__ = [
    "ResizeLongestSide",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "sam_model_registry",
]


def _build_like_reference(config: SamConfig, checkpoint: str | Path | None) -> Sam:
    """The reference's builder semantics: eval, float32, CPU; random weights without a
    checkpoint (``torch.manual_seed`` then gives the reference's random weights)."""
    if checkpoint is None:
        model = build_model(config)
        model.encoder_dtype = model.decoder_dtype = None  # float32, as the reference
        return model.eval()
    return build_sam(config, checkpoint, device="cpu", precision="fp32")


def _builder(model_type: str | SamConfig) -> Callable[..., Sam]:
    """A reference-style builder for a registered name (or a config, e.g. a reduced size)."""
    config = model_type if isinstance(model_type, SamConfig) else get_config(model_type)

    def build(checkpoint: str | Path | None = None) -> Sam:
        return _build_like_reference(config, checkpoint)

    build.__name__ = build.__qualname__ = f"build_sam_{config.name}"
    build.__doc__ = (
        f"A {config.name} model as ``segment_anything``'s builder makes it: eval mode, "
        "float32, CPU, weights from ``checkpoint`` (a file path) or random when it is None."
    )
    return build


build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_t = _builder("vit_t")

sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}
for _name in MODEL_CONFIGS:  # every other model name we support
    sam_model_registry.setdefault(_name, _builder(_name))
del _name
