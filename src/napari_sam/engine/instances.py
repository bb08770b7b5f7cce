"""Instance segmentation of a whole image in one of three modes, one API for all of them.

- ``"ais"``: automatic instance segmentation (micro-sam): the model's AIS decoder turns the
  image embedding into foreground / centre-distance / boundary-distance maps, a seeded
  watershed turns those into instances (:mod:`.instance_segmentation`). Seconds on a CPU.
- ``"apg"``: automatic prompt generation (micro-sam >= 1.7): points derived from the same
  maps are decoded by SAM in batches, filtered into instances (:mod:`.prompt_generation`).
- ``"amg"``: SAM's automatic mask generator (a grid of points, :mod:`.automatic`). Any model.

Example::

    model = build_sam("vit_b_lm")                    # with its AIS decoder
    segmenter = SamInstanceSegmenter(model)          # mode "ais" (the model has a decoder)
    result = segmenter.segment(image)                # -> InstanceSegmentation
    result.labels                                    # (H, W) uint32, 0 = background

All work happens on an :class:`~napari_sam.engine.predictor.ImageEmbedding`: pass a cached
or stored one (``embedding=``) and no encoder runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.instance_decoder import DecodingStopped, InstanceDecoder
from .automatic import Progress, SamAutomaticMaskGenerator, run_to_end
from .instance_segmentation import AisParameters, instances_from_decoder_outputs
from .label_image import link_slices, masks_to_label_image
from .predictor import ImageEmbedding, SamPredictor
from .prompt_generation import ApgParameters, prompt_generation_job

MODES = ("ais", "apg", "amg")


@dataclass(frozen=True)
class DecoderOutputs:
    """The AIS decoder's maps for one image, each (H, W) float32 in [0, 1] at the original
    image size: ``foreground`` (object probability), ``center_distances`` (0 at an object's
    centre) and ``boundary_distances`` (0 on its boundary), both normalised per object."""

    foreground: np.ndarray
    center_distances: np.ndarray
    boundary_distances: np.ndarray


@dataclass(frozen=True)
class InstanceSegmentation:
    """One image's instances.

    Attributes:
        labels: (H, W) uint32, 0 = background, objects 1..n (ids consecutive).
        mode: "ais" | "apg" | "amg".
        decoder_outputs: the AIS decoder's maps (ais / apg), else None.
    """

    labels: np.ndarray
    mode: str
    decoder_outputs: DecoderOutputs | None = None

    @property
    def n_objects(self) -> int:
        return int(self.labels.max(initial=0))


def default_mode(model) -> str:
    """"ais" when ``model`` has an AIS decoder, else "amg"."""
    return "ais" if getattr(model, "instance_decoder", None) is not None else "amg"


@torch.no_grad()
def predict_decoder_outputs(model, embedding: ImageEmbedding,
                            cancel: threading.Event | None = None) -> DecoderOutputs | None:
    """Run ``model.instance_decoder`` on a stored/cached/just computed embedding (no encoder).
    Returns None when ``cancel`` is set (checked between the decoder's stages: a second at
    most on a CPU).

    Raises:
        ValueError: the model has no AIS decoder, or the embedding was made by other weights.
    """
    decoder = getattr(model, "instance_decoder", None)
    if decoder is None:
        raise ValueError(f"expected a model with an AIS decoder (e.g. vit_b_lm), got "
                         f"{getattr(model, 'model_type', type(model).__name__)} without one")
    signature = getattr(model, "signature", None)
    if signature is not None and embedding.model_signature != signature:
        raise ValueError(f"expected an embedding made by {signature}, got one made by "
                         f"{embedding.model_signature}")
    features = embedding.features.to(model.device, torch.float32)
    sizes = (tuple(embedding.input_size), tuple(embedding.original_size))
    if cancel is None or not isinstance(decoder, InstanceDecoder):
        maps = decoder(features, *sizes)
    else:
        try:
            maps = decoder(features, *sizes, should_stop=cancel.is_set)
        except DecodingStopped:
            return None
    maps = maps[0].float().cpu().numpy()  # (3, H, W)
    return DecoderOutputs(*(np.ascontiguousarray(m) for m in maps))


@dataclass
class SamInstanceSegmenter:
    """Instances of whole images (and stacks) with a SAM model, in one of :data:`MODES`.

    Args:
        model: a :class:`~napari_sam.model.Sam` (``build_sam``), or a :class:`SamPredictor`.
        mode: "ais" | "apg" | "amg"; None picks :func:`default_mode` (ais with a decoder).
        ais: watershed parameters (micro-sam's defaults), for "ais".
        apg: prompt-generation parameters (micro-sam's defaults), for "apg".
        amg: keyword arguments of :class:`SamAutomaticMaskGenerator`, for "amg".
        amg_min_size: for "amg", objects with fewer visible pixels are dropped.
    Raises:
        ValueError: unknown mode, invalid parameters, or ais/apg without an AIS decoder.
    """

    model: object
    mode: str | None = None
    ais: AisParameters = field(default_factory=AisParameters)
    apg: ApgParameters = field(default_factory=ApgParameters)
    amg: dict = field(default_factory=dict)
    amg_min_size: int = 0

    def __post_init__(self) -> None:
        self.predictor = self.model if isinstance(self.model, SamPredictor) else SamPredictor(self.model)
        self.model = self.predictor.model
        self.mode = default_mode(self.model) if self.mode is None else self.mode
        if self.mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, got {self.mode!r}")
        if self.mode != "amg" and getattr(self.model, "instance_decoder", None) is None:
            raise ValueError(f"expected a model with an AIS decoder for mode {self.mode!r} (e.g. "
                             f"vit_b_lm), got {self.model.model_type} without one: use mode 'amg'")
        self.ais.validate()
        self.apg.validate()
        self._amg = SamAutomaticMaskGenerator(self.model, **self.amg) if self.mode == "amg" else None

    # ------------------------------------------------------------------ public API
    def segment(self, image: np.ndarray | None = None, *, embedding: ImageEmbedding | None = None,
                contrast_limits: tuple[float, float] | None = None) -> InstanceSegmentation:
        """Instances of ``image`` ((H, W) or (H, W, C), any dtype), or of the image behind
        ``embedding`` alone (ais / apg need no pixels; amg does)."""
        return run_to_end(self.job(image, embedding=embedding, contrast_limits=contrast_limits))

    def job(self, image: np.ndarray | None = None, *, embedding: ImageEmbedding | None = None,
            contrast_limits: tuple[float, float] | None = None,
            cancel: threading.Event | None = None) -> Generator[Progress, None, InstanceSegmentation | None]:
        """:meth:`segment` as a long job: yields :class:`Progress`, returns the result, or
        None when ``cancel`` was set (checked between steps, i.e. within one prompt batch)."""
        if image is None and embedding is None:
            raise ValueError("expected an image or its embedding, got neither")
        if image is None and self.mode == "amg":
            raise ValueError("expected the image's pixels for mode 'amg' (its crops are "
                             "encoded again), got only an embedding")
        if embedding is None:
            yield Progress(0, 1, "encoding")
            embedding = self.predictor.encode_image(image, contrast_limits=contrast_limits)
            if cancel is not None and cancel.is_set():
                return None
        if self.mode == "amg":
            run = self._amg.run(image, embedding=embedding, contrast_limits=contrast_limits)
            try:
                while True:
                    try:
                        step = next(run)
                    except StopIteration as stop:
                        masks = stop.value
                        break
                    if cancel is not None and cancel.is_set():
                        return None
                    yield step
            finally:
                run.close()
            labels = masks_to_label_image(masks, min_size=self.amg_min_size)
            return InstanceSegmentation(labels.astype(np.uint32), "amg")
        yield Progress(0, 1, "AIS decoder")
        outputs = predict_decoder_outputs(self.model, embedding, cancel)
        if outputs is None or (cancel is not None and cancel.is_set()):
            return None
        maps = (outputs.foreground, outputs.center_distances, outputs.boundary_distances)
        if self.mode == "ais":
            yield Progress(0, 1, "watershed")
            labels = instances_from_decoder_outputs(*maps, **self.ais.as_kwargs())
        else:
            self.predictor.set_embedding(embedding)
            labels = yield from prompt_generation_job(self.predictor, *maps, self.apg, cancel=cancel)
            if labels is None:
                return None
        return InstanceSegmentation(np.asarray(labels, dtype=np.uint32), self.mode, outputs)

    def stack_job(self, stack, *, contrast_limits: tuple[float, float] | None = None,
                  embedding_for: Callable[[int], ImageEmbedding | None] | None = None,
                  link_iou: float = 0.25, cancel: threading.Event | None = None,
                  ) -> Generator[Progress, None, np.ndarray | None]:
        """Every slice of ``stack`` ((N, H, W[, C]), read one slice at a time), objects of
        consecutive slices overlapping with IoU >= ``link_iou`` sharing one id.

        ``embedding_for(i)`` may return slice i's cached/stored embedding (no encoder then).
        Returns (N, H, W) uint32 labels, or None when cancelled.
        """
        n = len(stack)
        if n == 0:
            raise ValueError(f"expected a stack of at least one slice, got shape {np.shape(stack)}")
        labels = None
        for z in range(n):
            embedding = embedding_for(z) if embedding_for is not None else None
            image = None if embedding is not None and self.mode != "amg" else np.asarray(stack[z])
            job = self.job(image, embedding=embedding, contrast_limits=contrast_limits, cancel=cancel)
            try:
                while True:
                    try:
                        step = next(job)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    total = max(step.total, 1)
                    yield Progress(z * total + step.done, n * total, f"slice {z + 1}/{n}: {step.message}")
                    if cancel is not None and cancel.is_set():
                        return None
            finally:
                job.close()
            if result is None:
                return None
            if labels is None:
                labels = np.zeros((n, *result.labels.shape), dtype=np.uint32)
            labels[z] = result.labels
        yield Progress(n, n, "linking slices")
        return link_slices(labels, min_iou=link_iou).astype(np.uint32)
