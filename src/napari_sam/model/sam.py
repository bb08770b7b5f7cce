"""The SAM assembly: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PIXEL_MEAN, PIXEL_STD, SamConfig
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sparse_upsample import full_resolution_logits, thresholded_masks
from .transformer import ImageSideCache


class Sam(nn.Module):
    """Segment Anything model with an encode / decode split.

    The engine talks to any model through this small interface (``image_size``,
    ``mask_threshold``, ``image_format``, ``preprocess``, ``encode``, ``decode``,
    ``image_side_cache``), which test doubles such as the oracle model also provide.
    Calling the model (:meth:`forward`) is the reference's batched end-to-end prediction.

    ``encoder_dtype`` / ``decoder_dtype`` (None = float32) select autocast precision.
    Outputs are ordinary tensors computed without gradients (``torch.no_grad``), as the
    reference's: client code may modify them in place or use them in autograd later.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        config: SamConfig,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
        self.encoder_dtype: torch.dtype | None = None
        self.decoder_dtype: torch.dtype | None = None
        self.model_type = config.name
        self.checkpoint_sha256: str | None = None
        self.set_instance_decoder(None)

    def set_instance_decoder(self, decoder: nn.Module | None) -> None:
        """Attach micro-sam's AIS decoder (``model.instance_decoder``; None: no AIS).

        Kept outside the module tree so that ``state_dict()`` stays exactly SAM's (the
        drop-in contract); it follows the model's ``.to(...)`` and stays in eval mode."""
        if decoder is not None:
            decoder = decoder.to(self.device).eval()
        object.__setattr__(self, "instance_decoder", decoder)

    def __setattr__(self, name: str, value) -> None:
        if name == "instance_decoder":  # never a submodule: see set_instance_decoder
            self.set_instance_decoder(value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "instance_decoder", None) is not None:
            self.instance_decoder._apply(fn, *args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side S of the square model input."""
        return self.image_encoder.img_size

    @property
    def signature(self) -> str:
        """Identifies the weights for caches: model type + checkpoint hash."""
        return f"{self.model_type}:{self.checkpoint_sha256 or 'unknown'}"

    def _autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) RGB float in [0, 255], h, w <= S -> (B, 3, S, S) normalised, padded
        with zeros at the bottom and right."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) preprocessed input -> (B, C, S/16, S/16) float32 embeddings."""
        with self._autocast(self.encoder_dtype):
            features = self.image_encoder(x)
        return features.float()

    @torch.no_grad()
    def image_side_cache(self, features: Tensor) -> ImageSideCache:
        """Prompt-independent decoder work for one image's (1, C, He, We) features, valid
        for every prompt without a mask input."""
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        with self._autocast(self.decoder_dtype):
            return self.mask_decoder.transformer.image_side(
                features + dense, self.prompt_encoder.get_dense_pe()
            )

    @torch.no_grad()
    def decode(
        self,
        features: Tensor,
        points_xy: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes_xyxy: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
        cache: ImageSideCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode a batch of B prompts against one image.

        Args:
            features: (1, C, He, We) image embedding.
            points_xy: (B, N, 2) float, (x, y) in model-input pixels; with point_labels
                (B, N) int: 1 positive, 0 negative, -1 padding.
            boxes_xyxy: (B, 4) float, model-input pixels.
            mask_input: (B, 1, 4He, 4We) logits from a previous prediction.
            multimask_output: 3 candidate masks (True) or 1.
            cache: :meth:`image_side_cache` of ``features``; ignored with a mask input.
        Returns:
            low-res mask logits (B, K, 4He, 4We) float32 and IoU predictions (B, K).
        """
        masks, iou = self._decode(
            features, points_xy, point_labels, boxes_xyxy, mask_input, multimask_output, cache
        )
        return masks.float(), iou.float()

    @torch.no_grad()
    def decode_above(
        self,
        features: Tensor,
        points_xy: Tensor,
        point_labels: Tensor,
        min_iou: float,
        multimask_output: bool = True,
        cache: ImageSideCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`decode` of B point prompts, with masks made only for the B' prompts with
        a predicted IoU above ``min_iou`` (the mask upscaling is skipped for the others).

        Returns:
            prompt indices (B',) int64, their low-res logits (B', K, 4He, 4We) float32,
            and the IoU predictions of all prompts (B, K) float32.
        """
        masks, iou, rows = self._decode(
            features, points_xy, point_labels, None, None, multimask_output, cache, min_iou
        )
        return rows, masks.float(), iou.float()

    def _decode(
        self, features, points_xy, point_labels, boxes_xyxy, mask_input, multimask_output, cache,
        min_iou=None,
    ):
        points = None if points_xy is None else (points_xy, point_labels)
        with self._autocast(self.decoder_dtype):
            sparse, dense = self.prompt_encoder(points, boxes_xyxy, mask_input)
            if mask_input is None:
                dense = dense[:1]  # identical for every prompt: share the image side
            else:
                cache = None
            extra = {} if min_iou is None else {"min_iou": min_iou}
            return self.mask_decoder(
                features,
                None if cache is not None else self.prompt_encoder.get_dense_pe(),
                sparse,
                dense,
                multimask_output,
                cache,
                **extra,
            )

    @torch.no_grad()
    def forward(self, batched_input: list[dict], multimask_output: bool) -> list[dict]:
        """End-to-end prediction for a batch of images, as ``segment_anything``'s ``Sam``.

        Args:
            batched_input: one dict per image with
                "image": (3, h, w) RGB tensor in [0, 255], already resized (longest side S,
                    e.g. with ``ResizeLongestSide.apply_image``);
                "original_size": (H, W) of the image before resizing;
                optional prompts, in model-input pixels (``ResizeLongestSide``'s
                ``apply_coords_torch`` / ``apply_boxes_torch``):
                "point_coords": (B, N, 2) (x, y) with "point_labels": (B, N);
                "boxes": (B, 4) xyxy; "mask_inputs": (B, 1, 4He, 4We) logits.
            multimask_output: 3 candidate masks per prompt (True) or 1.
        Returns:
            one dict per image: "masks" (B, C, H, W) bool, "iou_predictions" (B, C) float32,
            "low_res_logits" (B, C, 4He, 4We) float32; C = 3 or 1.
        """
        images = torch.stack([self.preprocess(r["image"]) for r in batched_input])  # (N, 3, S, S)
        embeddings = self.encode(images)  # (N, C, He, We)
        outputs = []
        for record, features in zip(batched_input, embeddings):
            low_res, iou = self.decode(
                features[None],  # (1, C, He, We)
                record.get("point_coords"),
                record.get("point_labels") if "point_coords" in record else None,
                record.get("boxes"),
                record.get("mask_inputs"),
                multimask_output,
            )
            (masks,) = self.postprocess_thresholded(
                low_res,
                tuple(int(v) for v in record["image"].shape[-2:]),
                tuple(int(v) for v in record["original_size"]),
            )
            outputs.append(
                {
                    "masks": masks,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Low-res logits (B, K, s, s) -> logits (B, K, H, W) at the original image size.

        Same two bilinear steps as the reference: up to the padded input (S, S), crop the
        padding away, then to the original size (skipped when it is the identity).
        """
        return full_resolution_logits(masks, self.image_size, input_size, original_size)

    def postprocess_thresholded(
        self,
        masks: Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        thresholds: Sequence[float] | None = None,
    ) -> list[Tensor]:
        """``postprocess_masks(masks, …) > t`` as (B, K, H, W) bool, one per threshold
        (default: ``[mask_threshold]``), bit-identical but interpolating only the tiles
        whose low-res neighbourhood straddles a threshold (see :mod:`.sparse_upsample`)."""
        if thresholds is None:
            thresholds = [self.mask_threshold]
        return thresholded_masks(masks, self.image_size, input_size, original_size, thresholds)
