"""``SamPredictor``: encode an image once, then decode prompts in milliseconds.

Drop-in compatible with ``segment_anything.SamPredictor`` (same methods, arguments,
return values and public attributes, see :mod:`napari_sam.compat`), plus
microscopy-friendly input handling and a separable embedding (:class:`ImageEmbedding`) for
caches and on-disk stores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..model.common import DerivedFromParameters
from ..model.interrupt import Stopped, stop_when
from .image import ResizeLongestSide, require_resizable, to_rgb_uint8

__all__ = [
    "ImageEmbedding",
    "PreparedEmbedding",
    "SamPredictor",
    "Stopped",
    "full_res_masks",
    "sort_box_corners",
    "stop_when",
]


@dataclass(frozen=True)
class ImageEmbedding:
    """The encoder output for one image, with what is needed to decode against it.

    Attributes:
        features: (1, C, He, We) float32 image embedding.
        original_size: (H, W) of the image given to ``set_image``.
        input_size: (h, w) of the resized image inside the padded (S, S) model input.
        model_signature: which weights made it (``Sam.signature``); decoding with other
            weights would silently give nonsense, so ``set_embedding`` checks it.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    model_signature: str


@dataclass(frozen=True)
class PreparedEmbedding:
    """An :class:`ImageEmbedding` made ready to decode, in any thread, by
    :meth:`SamPredictor.prepare_embedding`; :meth:`SamPredictor.set_embedding` then makes
    it current without redoing that work on its own thread.

    Attributes:
        embedding: the embedding it was made from.
        features: (1, C, He, We) float32 copy of ``embedding.features`` as a plain tensor
            (not an inference tensor) on the predictor's device: the tensor the predictor
            makes current.
        image_side: the decoder's per-image work for ``features``, keyed, as the
            predictor's own, on that tensor and on the decoder's weights as they were when
            it was computed: weights changed since then are never decoded with it.
    """

    embedding: ImageEmbedding
    features: torch.Tensor
    image_side: DerivedFromParameters


def _model_signature(model) -> str:
    return getattr(model, "signature", type(model).__name__)


class SamPredictor:
    """Predict masks for one image from points, boxes and mask prompts.

    Args:
        sam_model: a :class:`~napari_sam.model.Sam` (or any model with the same
            ``preprocess``/``encode``/``decode`` interface).

    Public attributes, as the reference predictor's:
        model, transform (:class:`~napari_sam.engine.image.ResizeLongestSide`), device;
        features: (1, C, He, We) float32 embedding of the current image (a plain tensor,
            not an inference tensor), None before an image is set;
        original_size: (H, W) of the current image; input_size: (h, w) of its resized copy
            inside the (S, S) model input; orig_h, orig_w, input_h, input_w: the same as
            single numbers (None before an image is set);
        is_image_set: bool.
    Code may set ``features``, ``original_size``, ``input_size`` and ``is_image_set``
    directly (precomputed embeddings, as micro-sam does): every assignment drops the
    per-image decoder cache, which is also keyed on the ``features`` tensor it was built
    from and on the decoder's weights (their in-place versions), so ``predict`` always
    decodes the current features with the current weights.
    """

    def __init__(self, sam_model) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.reset_image()

    # ------------------------------------------------------------------ current image
    # Properties so that any assignment (set_embedding or client code) invalidates what
    # was derived from the previous image.
    @property
    def features(self) -> torch.Tensor | None:
        return self._features

    @features.setter
    def features(self, value: torch.Tensor | None) -> None:
        self._features = value
        self._image_changed()

    @property
    def original_size(self) -> tuple[int, int] | None:
        return self._original_size

    @original_size.setter
    def original_size(self, value) -> None:
        self._original_size = _as_size(value)
        self.orig_h, self.orig_w = _height_width(self._original_size)
        self._image_changed()

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self._input_size

    @input_size.setter
    def input_size(self, value) -> None:
        self._input_size = _as_size(value)
        self.input_h, self.input_w = _height_width(self._input_size)
        self._image_changed()

    def _image_changed(self) -> None:
        self._embedding = None
        self._image_side = DerivedFromParameters()

    # ------------------------------------------------------------------ encoding
    def encode_image(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        contrast_limits: tuple[float, float] | None = None,
        cancel=None,
    ) -> ImageEmbedding:
        """Encode ``image`` without changing the predictor's state (thread-friendly).

        Args:
            image: (H, W) grayscale or (H, W, 3|4) colour, dtype uint8, uint16, int,
                float or bool. See :mod:`napari_sam.engine.image` for the normalisation.
            image_format: "RGB" or "BGR" channel order of a colour image.
            contrast_limits: optional (low, high) display range mapped to 0…255.
            cancel: optional ``threading.Event``; once set, the encoder stops at its next
                block (well under a second on a CPU) and :class:`Stopped` is raised.
        Raises:
            Stopped: ``cancel`` was set during the encode.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"expected image_format 'RGB' or 'BGR', got {image_format!r}")
        rgb = to_rgb_uint8(image, contrast_limits)
        if image_format != self.model.image_format:
            rgb = rgb[..., ::-1]
        require_resizable(rgb.shape[:2], self.transform.target_length)
        resized = self.transform.apply_image(np.ascontiguousarray(rgb))
        x = torch.from_numpy(np.array(resized)).to(self.device).permute(2, 0, 1)[None].float()
        # an enclosing stop_when (e.g. a job's) still applies, with or without cancel
        with stop_when(None if cancel is None else cancel.is_set):
            return self.encode_torch_image(x, rgb.shape[:2])

    def encode_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> ImageEmbedding:
        """(1, 3, h, w) float RGB in [0, 255], already resized (longest side S) -> embedding."""
        s = self.model.image_size
        if (
            transformed_image.dim() != 4
            or transformed_image.shape[:2] != (1, 3)
            or max(transformed_image.shape[2:]) != s
        ):
            raise ValueError(
                f"expected a (1, 3, h, w) tensor with max(h, w) == {s}, "
                f"got {tuple(transformed_image.shape)}"
            )
        features = self.model.encode(self.model.preprocess(transformed_image))
        return ImageEmbedding(
            features=features,
            original_size=tuple(int(v) for v in original_image_size[:2]),
            input_size=tuple(int(v) for v in transformed_image.shape[-2:]),
            model_signature=_model_signature(self.model),
        )

    def set_image(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        contrast_limits: tuple[float, float] | None = None,
    ) -> None:
        """Encode ``image`` and make it the current image (see :meth:`encode_image`)."""
        self.set_embedding(self.encode_image(image, image_format, contrast_limits))

    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Reference-compatible: encode an already resized (1, 3, h, w) tensor."""
        self.set_embedding(self.encode_torch_image(transformed_image, original_image_size))

    def set_embedding(self, embedding: ImageEmbedding, prepared: PreparedEmbedding | None = None) -> None:
        """Make a previously computed embedding current, without re-encoding.

        Args:
            embedding: the embedding.
            prepared: optional :meth:`prepare_embedding` of ``embedding`` (done in another
                thread): its features and decoder work are used, not redone here. Ignored
                when made from another embedding or for another device.
        """
        self._require_signature(embedding)
        if prepared is not None and (
            prepared.embedding is not embedding or prepared.features.device != self.device
        ):
            prepared = None
        features = self._plain_features(embedding) if prepared is None else prepared.features
        self.features = features
        self.original_size = embedding.original_size
        self.input_size = embedding.input_size
        self._embedding = embedding
        if prepared is not None:  # after the assignments above, which reset it
            self._image_side = prepared.image_side
        self.is_image_set = True

    def snapshot(self) -> SamPredictor:
        """A predictor on the current image that stays on it: later ``set_image`` /
        ``set_embedding`` calls on this one do not change it (same model and decoder
        work, no copy of either). For decoding in another thread while this one moves on;
        the two must not be used to change the model's weights meanwhile."""
        self._require_image()
        # a shallow copy suffices: a new image rebinds the features, sizes and embedding
        # and gives the predictor a new holder of the per-image decoder work
        # (_image_changed), so the copy keeps the current ones, shared, not recomputed
        return copy.copy(self)

    def prepare_embedding(self, embedding: ImageEmbedding) -> PreparedEmbedding:
        """The work :meth:`set_embedding` and :meth:`prepare_decoder` do for ``embedding``
        (a plain copy of its features, the decoder's per-image projections), done now
        without changing the predictor's state: thread-friendly, e.g. in the worker that
        encoded it, so that ``set_embedding(embedding, prepared)`` on the GUI thread is
        instant. Hand the result to one predictor.

        Raises:
            ValueError: ``embedding`` was made by other weights (see :attr:`model_signature`).
        """
        self._require_signature(embedding)
        features = self._plain_features(embedding)
        image_side = DerivedFromParameters()
        _image_side_of(self.model, features, image_side)
        return PreparedEmbedding(embedding, features, image_side)

    @property
    def model_signature(self) -> str:
        """Which weights it decodes with: the ``model_signature`` its embeddings must have."""
        return _model_signature(self.model)

    def _require_signature(self, embedding: ImageEmbedding) -> None:
        expected = self.model_signature
        if embedding.model_signature != expected:
            raise ValueError(
                f"expected an embedding made by {expected}, got one made by "
                f"{embedding.model_signature}"
            )

    def _plain_features(self, embedding: ImageEmbedding) -> torch.Tensor:
        """``embedding.features`` on the predictor's device, copied if it is an inference
        tensor (clients may run autograd or in-place ops on ``predictor.features``)."""
        features = embedding.features.to(self.device)
        if features.is_inference():
            with torch.inference_mode(False):
                features = features.clone()
        return features

    def get_embedding(self) -> ImageEmbedding:
        """The current :class:`ImageEmbedding` (to cache or store it)."""
        self._require_image()
        if self._embedding is None:  # features/sizes were assigned directly
            self._embedding = ImageEmbedding(
                features=self.features,
                original_size=self.original_size,
                input_size=self.input_size,
                model_signature=_model_signature(self.model),
            )
        return self._embedding

    def get_image_embedding(self) -> torch.Tensor:
        """The current (1, C, He, We) image embedding."""
        self._require_image()
        return self.features

    def reset_image(self) -> None:
        """Forget the current image (features, sizes and per-image caches)."""
        self.is_image_set = False
        self.features = None
        self.original_size = None  # also orig_h, orig_w = None
        self.input_size = None  # also input_h, input_w = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image() or set_embedding() first")

    # ------------------------------------------------------------------ decoding
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one object of the current image.

        Args:
            point_coords: (N, 2) float, (x, y) pixels of the original image.
            point_labels: (N,) int, 1 = foreground, 0 = background, -1 = ignored (padding).
            box: (4,) or (1, 4) float, x0 y0 x1 y1 pixels of the original image; corners
                given in any order (x1 < x0 or y1 < y0) are sorted per axis.
            mask_input: (1, 4He, 4We) finite low-res logits from a previous call (256x256
                for SAM).
            multimask_output: three candidate masks (True) or one.
            return_logits: return logits instead of thresholded masks.
        Returns:
            masks (C, H, W) bool (float32 logits with return_logits), iou predictions (C,)
            float32, low-res logits (C, 4He, 4We) float32; C = 3 or 1.
        Raises:
            ValueError: a prompt of the wrong shape, with non-finite values, or labels
                outside {-1, 0, 1}.
        """
        self._require_image()
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("expected point_coords and point_labels together, got only one")
            coords = _as_float_array(point_coords, "point_coords")
            labels = _as_point_labels(point_labels)
            if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != (coords.shape[0],):
                raise ValueError(
                    "expected point_coords (N, 2) and point_labels (N,), "
                    f"got {coords.shape} and {labels.shape}"
                )
            _require_finite(coords, "point_coords")
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = _as_float_array(box, "box")
            if box.size != 4:
                raise ValueError(f"expected box of shape (4,) or (1, 4), got {box.shape}")
            _require_finite(box, "box")
            box = self.transform.apply_boxes(sort_box_corners(box.reshape(4)), self.original_size)
            box_t = torch.as_tensor(box, dtype=torch.float, device=self.device)  # (1, 4)
        if mask_input is not None:
            mask = _as_float_array(mask_input, "mask_input").astype(np.float32)
            size = self.low_res_size
            if mask.shape != (1, *size):
                raise ValueError(f"expected mask_input of shape (1, {size[0]}, {size[1]}), got {mask.shape}")
            if not np.isfinite(mask).all():
                bad = int((~np.isfinite(mask)).sum())
                raise ValueError(
                    f"expected finite mask_input logits, got {bad} of {mask.size} values NaN or inf"
                )
            mask_t = torch.as_tensor(mask, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @property
    def low_res_size(self) -> tuple[int, int]:
        """(h, w) of low-res mask logits: 4x the embedding grid (256, 256 for SAM)."""
        self._require_image()
        he, we = self.features.shape[-2:]
        return 4 * he, 4 * we

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction; coordinates already in model-input pixels
        (use ``predictor.transform.apply_coords_torch``).

        Args:
            point_coords: (B, N, 2) (x, y); point_labels (B, N).
            boxes: (B, 4) xyxy (corners in any order: sorted per axis).
            mask_input: (B, 1, 4He, 4We) logits.
        Returns:
            masks (B, C, H, W) bool (or logits), iou (B, C), low-res logits (B, C, 4He, 4We).
        """
        low_res, iou = self.decode_low_res(
            point_coords, point_labels, boxes, mask_input, multimask_output
        )
        if return_logits:
            masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        else:
            (masks,) = full_res_masks(self.model, low_res, self.input_size, self.original_size)
        return masks, iou, low_res

    def decode_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`predict_torch` but stops at the low-res logits (B, C, 4He, 4We) and IoU
        (B, C): the cheap part, for code that filters before upsampling."""
        self._require_image()
        if boxes is not None:  # corners in any order -> (x0, y0, x1, y1) with x0 <= x1, y0 <= y1
            corners = boxes.reshape(-1, 2, 2)  # (B, 2 corners, (x, y))
            sorted_ = torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)  # (B, 4)
            boxes = sorted_.reshape(boxes.shape)
        cache = None if mask_input is not None else self._image_side_cache()
        return self.model.decode(
            self.features, point_coords, point_labels, boxes, mask_input, multimask_output, cache
        )

    def decode_low_res_above(
        self,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        min_iou: float,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode_low_res` of B point prompts keeping only the B' prompts with a
        predicted IoU above ``min_iou`` (a model with ``decode_above`` skips the mask
        upscaling of the others).

        Returns:
            prompt indices (B',) int64, their low-res logits (B', C, 4He, 4We), and the
            IoU predictions of all prompts (B, C).
        """
        self._require_image()
        decode_above = getattr(self.model, "decode_above", None)
        if decode_above is None:
            low_res, iou = self.decode_low_res(point_coords, point_labels, None, None, multimask_output)
            rows = (iou > min_iou).any(dim=1).nonzero()[:, 0]
            return rows, low_res[rows], iou
        return decode_above(
            self.features, point_coords, point_labels, min_iou, multimask_output, self._image_side_cache()
        )

    def prepare_decoder(self) -> None:
        """Compute and keep the per-image, prompt-independent decoder work (the image-side
        projections every prompt reuses) for the current embedding, so that the first
        prompt does not pay for it. No-op without an image."""
        if self.is_image_set:
            self._image_side_cache()

    def _image_side_cache(self):
        """The model's prompt-independent decoder work for the current features."""
        return _image_side_of(self.model, self.features, self._image_side)


def _image_side_of(model, features: torch.Tensor, derived: DerivedFromParameters):
    """``model.image_side_cache(features)``, kept in ``derived``: done once per image and
    reused by every later call; remade when the features or the decoder's weights change
    in place (client code, load_state_dict), so they are never decoded against stale
    projections. Inference-mode features cannot change in place outside inference mode:
    they are keyed by identity alone (a new features tensor resets the cache)."""
    sources = (None if features.is_inference() else features, *_decoder_tensors(model))
    return derived.get(
        sources,
        getattr(model, "decoder_dtype", None),
        lambda: model.image_side_cache(features),
    )


def full_res_masks(
    model,
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    thresholds=None,
) -> list[torch.Tensor]:
    """Thresholded full-resolution masks: ``model.postprocess_masks(low_res, …) > t``.

    Args:
        model: a model with the engine interface; its ``postprocess_thresholded`` (the
            same masks bit for bit, interpolating only near their borders) is used where
            it has one, else the full ``postprocess_masks``.
        low_res: (B, K, h, w) float low-res logits.
        input_size: (h_in, w_in) of the resized image inside the (S, S) model input.
        original_size: (H, W) of the image.
        thresholds: logit thresholds; None: ``[model.mask_threshold]``.
    Returns:
        one (B, K, H, W) bool tensor per threshold.
    """
    if thresholds is None:
        thresholds = [model.mask_threshold]
    binary = getattr(model, "postprocess_thresholded", None)
    if binary is not None:
        return binary(low_res, input_size, original_size, thresholds)
    logits = model.postprocess_masks(low_res, input_size, original_size)
    return [logits > t for t in thresholds]


def _decoder_tensors(model) -> tuple[torch.Tensor, ...]:
    """The parameters and buffers a model decodes with: those of its prompt encoder and mask
    decoder (a SAM), else all of a torch module's (any other model), else none."""
    parts = [getattr(model, name, None) for name in ("prompt_encoder", "mask_decoder")]
    modules = [m for m in parts if isinstance(m, torch.nn.Module)]
    if not modules and isinstance(model, torch.nn.Module):
        modules = [model]
    return tuple(t for m in modules for ts in (m.parameters(), m.buffers()) for t in ts)


def _as_size(value) -> tuple[int, int] | None:
    """(H, W) as a tuple of Python ints (from a tuple, list, array or torch.Size), or None."""
    if value is None:
        return None
    return tuple(int(v) for v in value)


def _height_width(size: tuple[int, ...] | None) -> tuple[int | None, int | None]:
    return (size[0], size[1]) if size is not None and len(size) >= 2 else (None, None)


def _require_finite(values: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"expected finite {name}, got {values.tolist()}")


def sort_box_corners(box_xyxy: np.ndarray) -> np.ndarray:
    """(..., 4) x0 y0 x1 y1 with corners in any order -> (..., 4) min/max per axis."""
    corners = np.asarray(box_xyxy, dtype=np.float64).reshape(*np.shape(box_xyxy)[:-1], 2, 2)
    return np.concatenate([corners.min(axis=-2), corners.max(axis=-2)], axis=-1)


def _as_float_array(values, name: str) -> np.ndarray:
    """``values`` as a float64 array, or a ValueError naming ``name`` (strings, objects…)."""
    array = np.asarray(values)
    if array.dtype != bool and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"expected real numbers for {name}, got an array of dtype {array.dtype}")
    return array.astype(np.float64)


def _as_point_labels(point_labels) -> np.ndarray:
    """(N,) labels in {-1, 0, 1} (ints, bools or integral floats) -> int64 array."""
    labels = np.asarray(point_labels)
    numeric = labels.dtype == bool or np.issubdtype(labels.dtype, np.integer) or np.issubdtype(
        labels.dtype, np.floating
    )
    if not numeric or not np.isin(labels, (-1, 0, 1)).all():
        shown = labels.tolist() if labels.size <= 10 else f"{labels.size} values of dtype {labels.dtype}"
        raise ValueError(
            "expected point_labels in {1 (foreground), 0 (background), -1 (ignored)}, "
            f"got {shown}"
        )
    return labels.astype(np.int64)
