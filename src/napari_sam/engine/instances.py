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

Images larger than the model's input can be segmented tile by tile at full resolution
(``tiling="auto"|"on"``, or ``grid=``, or a ``TiledEmbedding``): each mode runs per tile
and the objects are stitched across tile borders (:mod:`.tiled_instances`,
:mod:`.stitching`), into a numpy array or any array-like ``out=`` (zarr).
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
from .label_image import link_slice, masks_to_label_image
from .predictor import ImageEmbedding, SamPredictor, Stopped
from .prompt_generation import ApgParameters, prompt_generation_job
from .tiled_instances import nested_job, tiled_labels_job
from .tiled_predictor import TiledEmbedding
from .tiling import TileGrid, image_hw_of, tile_grid

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
        labels: (H, W) uint32, 0 = background, objects 1..n (ids consecutive); the ``out``
            array-like it was written into when one was given (e.g. zarr).
        mode: "ais" | "apg" | "amg".
        decoder_outputs: the AIS decoder's maps (ais / apg, untiled), else None.
        count: the number of objects when known without reading ``labels`` (tiled runs).
    """

    labels: np.ndarray
    mode: str
    decoder_outputs: DecoderOutputs | None = None
    count: int | None = None

    @property
    def n_objects(self) -> int:
        """K, the number of objects (ids are 1..K)."""
        return int(self.labels.max(initial=0)) if self.count is None else self.count


def default_mode(model) -> str:
    """"ais" when ``model`` has an AIS decoder, else "amg"."""
    return "ais" if getattr(model, "instance_decoder", None) is not None else "amg"


@torch.no_grad()
def predict_decoder_outputs(model, embedding: ImageEmbedding,
                            cancel: threading.Event | None = None) -> DecoderOutputs | None:
    """Run ``model.instance_decoder`` on a stored/cached/just computed embedding (no encoder).
    Returns None when ``cancel`` is set, or, with a ``cancel`` given, when the stop check of
    an enclosing :func:`.stop_when` (e.g. a napari job's) fires: the decoder checks between
    its stages and between bands of conv rows (~17 GFLOP apart, ~0.2 s on a quiet CPU; see
    :mod:`napari_sam.model.instance_decoder`).

    Raises:
        ValueError: the model has no AIS decoder, or the embedding was made by other weights.
        DecodingStopped: without ``cancel``, an enclosing stop check fired.
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
        stitch_overlap: tiled runs: two objects of overlapping tiles are one when the pixels
            they share exceed this fraction of the smaller (see :mod:`.stitching`).
    Raises:
        ValueError: unknown mode, invalid parameters, or ais/apg without an AIS decoder.
    """

    model: object
    mode: str | None = None
    ais: AisParameters = field(default_factory=AisParameters)
    apg: ApgParameters = field(default_factory=ApgParameters)
    amg: dict = field(default_factory=dict)
    amg_min_size: int = 0
    stitch_overlap: float = 0.5

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
        if not 0 < self.stitch_overlap <= 1:
            raise ValueError(f"expected 0 < stitch_overlap <= 1, got {self.stitch_overlap}")
        self._amg = SamAutomaticMaskGenerator(self.model, **self.amg) if self.mode == "amg" else None

    # ------------------------------------------------------------------ public API
    def segment(self, image=None, **options) -> InstanceSegmentation:
        """Instances of ``image`` ((H, W) or (H, W, C) array-like, any dtype), or of the
        image behind an embedding alone (ais / apg need no pixels; amg does). ``options``:
        those of :meth:`job` (but ``cancel``)."""
        return run_to_end(self.job(image, **options))

    def job(self, image=None, *, embedding: ImageEmbedding | TiledEmbedding | None = None,
            contrast_limits=None, cancel: threading.Event | None = None, tiling="off",
            tile_shape=None, halo=None, grid: TileGrid | None = None,
            embedding_for: Callable[[int], ImageEmbedding | None] | None = None,
            out=None) -> Generator[Progress, None, InstanceSegmentation | None]:
        """:meth:`segment` as a long job: yields :class:`Progress`, returns the result, or
        None when ``cancel`` was set (checked between steps, i.e. within one prompt batch,
        and between tiles).

        Args:
            image: (H, W) or (H, W, C) array-like (numpy, memmap, zarr, dask: a tiled run
                reads one tile at a time), or None with an embedding (ais / apg).
            embedding: the image's :class:`ImageEmbedding` (untiled), or a
                :class:`~napari_sam.engine.tiled_predictor.TiledEmbedding` (tiled on its
                grid, normalised as it was): no encoder call.
            contrast_limits: (low, high) mapped to 0..255 before encoding; None: the image's
                own robust range (tiled: one range for all tiles, as "auto").
            tiling: "off" (default: one squeezed encode, as SAM does), "auto" (tiled when the
                longest side exceeds :data:`~napari_sam.engine.tiling.AUTO_TILING_FACTOR`
                model inputs) or "on"; ``tile_shape``, ``halo``: see
                :func:`~napari_sam.engine.tiling.tile_grid` (defaults from the model's
                ``image_size``).
            grid: an explicit :class:`TileGrid` instead (e.g. a store's), tiled whatever
                ``tiling`` says.
            embedding_for: ``embedding_for(k)`` -> tile k's cached/stored embedding, or None
                to encode it (tiled runs only).
            out: (H, W) integer array-like of zeros to write the labels into (e.g. a zarr
                array, written one tile region at a time); default a new numpy array.
        Returns (the job's value) an :class:`InstanceSegmentation`; tiled: ``labels`` is
        ``out`` (ids 1..K stitched across tiles, see :mod:`.stitching`), ``count`` is K and
        ``decoder_outputs`` None.
        """
        if image is None and embedding is None and embedding_for is None:
            raise ValueError("expected an image or its embedding, got neither")
        if image is None and self.mode == "amg":
            raise ValueError("expected the image's pixels for mode 'amg' (its crops are "
                             "encoded again), got only an embedding")
        grid = self._grid(image, embedding, tiling, tile_shape, halo, grid, embedding_for)
        if grid is not None:
            return (yield from self._tiled_job(image, grid, embedding, contrast_limits, embedding_for,
                                               out, cancel))
        result = yield from self._labels_job(image, embedding, contrast_limits, cancel)
        if result is None:
            return None
        labels, outputs = result
        if out is not None:
            _check_out(out, labels.shape)
            out[...] = labels
            labels = out
        return InstanceSegmentation(labels, self.mode, outputs)

    def _grid(self, image, embedding, tiling, tile_shape, halo, grid, embedding_for) -> TileGrid | None:
        """The tiling of this run, or None (untiled)."""
        if isinstance(embedding, TiledEmbedding):
            if grid is not None and grid != embedding.grid:
                raise ValueError(f"expected the tiled embedding's grid {embedding.grid}, got {grid}")
            return embedding.grid
        if embedding is not None:
            if grid is not None or embedding_for is not None:
                raise ValueError("expected a grid / embedding_for with a TiledEmbedding or an image, "
                                 "got an untiled ImageEmbedding")
            return None
        if grid is None and image is not None:
            grid = tile_grid(image_hw_of(image), self.model.image_size, tiling, tile_shape, halo)
        if grid is None and embedding_for is not None:
            raise ValueError("expected a grid (or tiling of a large image) with embedding_for, got none")
        return grid

    def _tiled_job(self, image, grid, embedding, contrast_limits, embedding_for, out, cancel):
        if isinstance(embedding, TiledEmbedding):
            tiles = embedding.tiles
            embedding_for = tiles.__getitem__
            contrast_limits = embedding.contrast_limits if contrast_limits is None else contrast_limits
        if out is not None:
            _check_out(out, grid.image_hw)
        min_size = self.amg_min_size if self.mode == "amg" else 0
        result = yield from tiled_labels_job(
            self._labels_job, self.predictor, image, grid, mode=self.mode, contrast_limits=contrast_limits,
            embedding_for=embedding_for, out=out, min_overlap=self.stitch_overlap, min_size=min_size,
            cancel=cancel)
        if self.mode == "apg":
            self.predictor.reset_image()  # the last tile's embedding is not kept
        if result is None:
            return None
        labels, count = result
        return InstanceSegmentation(labels, self.mode, None, count)

    def _labels_job(self, image, embedding, contrast_limits, cancel
                    ) -> Generator[Progress, None, tuple[np.ndarray, DecoderOutputs | None] | None]:
        """One (untiled) image or tile: ((H, W) uint32 labels, decoder outputs or None)."""
        if embedding is None:
            yield Progress(0, 1, "encoding")
            try:
                embedding = self.predictor.encode_image(np.asarray(image), contrast_limits=contrast_limits,
                                                        cancel=cancel)
            except Stopped:  # cancelled inside the encoder
                return None
            if cancel is not None and cancel.is_set():
                return None
        if self.mode == "amg":
            run = self._amg.run(np.asarray(image), embedding=embedding, contrast_limits=contrast_limits)
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
            return labels.astype(np.uint32), None
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
        return np.asarray(labels, dtype=np.uint32), outputs

    def stack_job(self, stack, *, contrast_limits: tuple[float, float] | None = None,
                  embedding_for: Callable[[int], object] | None = None,
                  link_iou: float = 0.25, cancel: threading.Event | None = None, out=None,
                  tiling="off", tile_shape=None, halo=None, grid: TileGrid | None = None,
                  ) -> Generator[Progress, None, object]:
        """Every slice of ``stack`` ((N, H, W[, C]) array-like, read one slice at a time),
        objects of consecutive slices overlapping with IoU >= ``link_iou`` sharing one id
        (as :func:`~napari_sam.engine.label_image.link_slices` on the whole stack).

        Slices are segmented, linked to the previous slice and written one at a time:
        besides ``out``, two slices' labels are in memory.

        Args:
            embedding_for: ``embedding_for(i)`` -> slice i's cached/stored embedding (no
                encoder then) or None; for tiled slices a
                :class:`~napari_sam.engine.tiled_predictor.TiledEmbedding` or a callable
                ``k -> ImageEmbedding | None`` (tile k of slice i).
            out: (N, H, W) array-like (e.g. a zarr array) written slice by slice; default a
                new (N, H, W) uint32 numpy array.
            tiling, tile_shape, halo, grid: tiling of every slice, as in :meth:`job`.
        Returns (the job's value) ``out`` with ids 1..K over the stack, or None when cancelled.
        """
        n = len(stack)
        if n == 0:
            raise ValueError(f"expected a stack of at least one slice, got shape {np.shape(stack)}")
        prev, next_id = None, 1
        for z in range(n):
            given = embedding_for(z) if embedding_for is not None else None
            options = {"tiling": tiling, "tile_shape": tile_shape, "halo": halo, "grid": grid}
            if callable(given) and not isinstance(given, (ImageEmbedding, TiledEmbedding)):
                options["embedding_for"], given = given, None  # tiles on demand: pixels for the rest
            whole = isinstance(given, (ImageEmbedding, TiledEmbedding)) and self.mode != "amg"
            image = None if whole else np.asarray(stack[z])
            job = self.job(image, embedding=given, contrast_limits=contrast_limits, cancel=cancel, **options)
            result = yield from nested_job(job, cancel, z, n, "slice")
            if result is None:
                return None
            labels = np.asarray(result.labels)
            if out is None:
                out = np.zeros((n, *labels.shape), dtype=np.uint32)
            _check_out(out, (n, *labels.shape))
            prev, next_id = link_slice(prev, labels, next_id, link_iou)
            out[z] = prev.astype(np.uint32)
            del result, labels
        return out


def _check_out(out, shape) -> None:
    """ValueError unless ``out`` is an integer array-like of ``shape``."""
    got = tuple(int(s) for s in getattr(out, "shape", ()))
    if got != tuple(shape) or not np.issubdtype(np.dtype(getattr(out, "dtype", object)), np.integer):
        raise ValueError(f"expected out an integer array of shape {tuple(shape)}, got shape {got} "
                         f"dtype {getattr(out, 'dtype', None)}")
