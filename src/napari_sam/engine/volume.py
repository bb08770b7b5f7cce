"""Propagate one object through a stack (z or t), and interpolate between annotated slices.

Each step prompts SAM on slice j with what was found on slice j -/+ 1, for every prompt
strategy combining:

* ``box``: the previous mask's bounding box, enlarged by ``box_margin`` of its size on
  each side (at least 2 px), so a growing or moving object still fits;
* ``points``: ``n_points`` positive points deep inside the previous mask (the maximum of
  its distance transform, then farthest-point spread over the deep interior), so they stay
  on the object when its outline moves;
* ``mask``: the previous slice's low-res logits as ``mask_input`` (a start or annotated
  mask without logits is converted by :func:`~napari_sam.engine.mask_prompt.mask_to_logits`,
  the same conversion the widget's refine uses).

Box and points move with the object: the shift between the last two kept slices'
centroids is applied to them (constant velocity), which matters for time series.

Default: ``"box+points"``, margin 0.25, 3 points, ``iou_threshold=0.5``. Measured with
``benchmarks/bench_volume.py compare`` (3D IoU with the truth, 6 synthetic scenarios:
ellipsoid with distractors, fast shape change, lateral drift as in a time series, a
touching neighbour, a curved tube, an object ending below another), on the oracle and on
a "SAM-like" oracle (prompts combined jointly, a box stops at intensity edges, +-2 px
border noise, a lone point returns part of the object half the time). Mean oracle /
SAM-like: box+points 0.89 / 0.79, box 0.89 / 0.79, points 0.93 / 0.79, one point 0.88 /
0.56. One point is ambiguous; points alone lost only where the plain oracle's box merges
touching objects whatever their intensity (SAM stops at edges: the SAM-like oracle
scores both 0.90). Box+points keeps the box — SAM's strongest prompt, it fixes the scale
(part vs whole), which points cannot — and the points pin the object when the box holds
several. With ``mask`` (the oracles honour it: a mask alone selects the region it covers
most, a box with a mask the area inside the box it covers most): mask 0.93 / 0.79,
points+mask 0.93 / 0.79, box+points+mask 0.89 / 0.79, box+mask 0.89 / 0.77 — the mask
neither helps nor harms there (earlier figures of 0.35 for mask alone came from an oracle
that copied the mask prompt, not from SAM). How much real SAM trusts a mask prompt the
oracles cannot tell (SAM learnt mask inputs as its own previous output, given with
points); re-run the comparison with real weights on annotated data
(``compare --image --labels``) before changing the default. Margin 0.1 loses growing
objects (0.21 on fast shape change, SAM-like); ``iou_threshold`` 0.3 runs into the next
object (0.07 on the object ending mid-stack), 0.7 stops too early (0.04 on drift).
SAM is asked for three candidates (the one closest to the previous mask is kept) only
for a lone point; a box or a mask prompt gives the extent, and choosing among candidates
by their likeness to the previous slice would only pull the result back to it.

Stopping: the mask vanishes (area < ``min_area``), its IoU with the previous slice falls
below ``iou_threshold`` (the prompt jumped to another object or leaked), the end of the
user's ``stop_range``, or the end of the stack. The slice that triggers a stop is not kept.

Long work is a generator yielding :class:`PropagationProgress` and returning the result;
close it (or set ``cancel``) to stop: it never writes anything, so cancelling changes no
label. It works on a private predictor: the caller's predictor keeps its current image.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .automatic import run_to_end
from .mask_prompt import mask_to_logits
from .predictor import SamPredictor, Stopped, stop_when

VANISHED, LOW_IOU, RANGE, END, MET = "vanished", "low_iou", "range", "end", "met_other_side"
DEFAULT_STRATEGY = "box+points"
STRATEGIES = ("box", "points", "mask", "box+mask", "points+mask", "box+points", "box+points+mask")


@dataclass(frozen=True)
class PromptStrategy:
    """Which prompts carry an object from one slice to the next (see module docstring)."""

    box: bool = True
    points: bool = True
    mask: bool = False
    box_margin: float = 0.25
    n_points: int = 3
    follow_motion: bool = True

    @classmethod
    def parse(cls, spec: str | PromptStrategy) -> PromptStrategy:
        """"box", "points", "mask" joined by "+" (e.g. "box+points") -> strategy."""
        if isinstance(spec, PromptStrategy):
            return spec
        parts = set(str(spec).split("+"))
        if not parts or not parts <= {"box", "points", "mask"}:
            raise ValueError(f"expected a strategy like {', '.join(STRATEGIES)}, got {spec!r}")
        return cls(box="box" in parts, points="points" in parts, mask="mask" in parts)


@dataclass(frozen=True)
class SliceStats:
    """One slice of the result. ``source``: "start", "annotated", "propagated" or
    "interpolated" (shape interpolation where SAM stopped). ``iou_prev``: IoU with the
    slice it was prompted from; ``score``: SAM's predicted IoU."""

    index: int
    area: int
    iou_prev: float
    score: float
    source: str


@dataclass(frozen=True)
class Stop:
    """Why one direction ended: ``reason`` in vanished, low_iou, range, end,
    met_other_side; ``index``: the slice that was rejected (None if none was)."""

    direction: int
    reason: str
    index: int | None = None
    iou_prev: float | None = None
    area: int | None = None


@dataclass(frozen=True)
class PropagationResult:
    """One 3D object.

    Attributes:
        first: index of the first slice of ``masks`` along the stack axis.
        masks: (K, H, W) bool, slices first … first + K - 1 (all slices between kept).
        stats: K :class:`SliceStats`, in slice order.
        stops: one :class:`Stop` per direction that ran.
    """

    first: int
    masks: np.ndarray
    stats: tuple[SliceStats, ...]
    stops: tuple[Stop, ...]

    @property
    def last(self) -> int:
        return self.first + self.masks.shape[0] - 1

    def to_volume(self, n_slices: int) -> np.ndarray:
        """(n_slices, H, W) bool, False outside ``first…last``."""
        out = np.zeros((n_slices, *self.masks.shape[1:]), dtype=bool)
        out[self.first : self.last + 1] = self.masks
        return out


@dataclass(frozen=True)
class PropagationProgress:
    index: int
    direction: int
    n_done: int
    area: int
    iou_prev: float


@dataclass
class _Slice:
    index: int
    mask: np.ndarray  # (H, W) bool
    logits: np.ndarray | None  # (1, 4He, 4We)
    stats: SliceStats


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def run_generator(gen: Generator):
    """Exhaust a progress generator synchronously and return its result (the engine's one
    driver, :func:`napari_sam.engine.automatic.run_to_end`, without a callback)."""
    return run_to_end(gen)


def box_prompt(mask: np.ndarray, margin: float) -> np.ndarray:
    """(4,) float x0 y0 x1 y1 around ``mask`` (H, W), enlarged and clipped to the image."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    my, mx = max(2.0, margin * (y1 - y0 + 1)), max(2.0, margin * (x1 - x0 + 1))
    h, w = mask.shape
    return np.array([max(0, x0 - mx), max(0, y0 - my), min(w - 1, x1 + mx), min(h - 1, y1 + my)])


def interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """(n', 2) float (x, y), n' <= n: deepest point of ``mask`` (H, W), then points spread
    over its deep interior (distance >= half the maximum) by farthest-point sampling."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, c0 = rows[0], cols[0]
    crop = np.pad(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 1)
    dist = ndimage.distance_transform_edt(crop)
    deep = np.argwhere(dist >= 0.5 * dist.max())  # (M, 2) row, col
    chosen = [np.array(np.unravel_index(np.argmax(dist), dist.shape))]
    gap = np.linalg.norm(deep - chosen[0], axis=1)
    while len(chosen) < n and gap.max() > 0:
        chosen.append(deep[np.argmax(gap)])
        gap = np.minimum(gap, np.linalg.norm(deep - chosen[-1], axis=1))
    rc = np.array(chosen, dtype=float) - 1 + (r0, c0)  # undo crop and padding
    return rc[:, ::-1].copy()  # (x, y)


def shape_interpolate(mask_a: np.ndarray, mask_b: np.ndarray, t: float) -> np.ndarray:
    """Blend two (H, W) bool masks through their signed distance maps; t in [0, 1]."""

    def sdf(m):
        return ndimage.distance_transform_edt(m) - ndimage.distance_transform_edt(~m)

    return ((1 - t) * sdf(mask_a) + t * sdf(mask_b)) > 0


def _centroid_xy(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()])


def _predict(predictor, prev: _Slice, strategy: PromptStrategy, shift_xy=(0.0, 0.0)):
    """Prompt from ``prev`` (moved by ``shift_xy``, the expected motion) -> the best mask
    (H, W) bool, its predicted IoU, its low-res logits (1, 4He, 4We)."""
    kwargs, (h, w) = {}, prev.mask.shape
    if strategy.box:
        box = box_prompt(prev.mask, strategy.box_margin) + np.tile(shift_xy, 2)
        kwargs["box"] = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    if strategy.points:
        pts = np.clip(interior_points(prev.mask, strategy.n_points) + shift_xy, 0, [w - 1, h - 1])
        kwargs.update(point_coords=pts, point_labels=np.ones(len(pts), dtype=int))
    if strategy.mask:
        logits = prev.logits
        kwargs["mask_input"] = mask_to_logits(prev.mask, predictor) if logits is None else logits
    # three candidates only for a lone point (ambiguous); a box or a mask gives the extent
    multimask = not (strategy.box or strategy.mask) and len(kwargs.get("point_coords", ())) <= 1
    masks, scores, low_res = predictor.predict(multimask_output=multimask, **kwargs)
    best = int(np.argmax([iou(m, prev.mask) for m in masks])) if multimask else 0
    return masks[best], float(scores[best]), low_res[best : best + 1]


def _embedding_or_none(embeddings, index: int, cancel):
    """``embeddings.embedding(index)``; an encode it needs stops within an encoder block
    once ``cancel`` is set, and then None is returned (nothing was stored or cached)."""
    if cancel is None:
        return embeddings.embedding(index)
    try:
        with stop_when(cancel.is_set):
            return embeddings.embedding(index)
    except Stopped:
        return None


def _walk(predictor, embeddings, prev: _Slice, step: int, limit: int, end_reason: str,
          strategy: PromptStrategy, iou_threshold: float, min_area: int, cancel, out: list):
    """Propagate from ``prev`` by ``step`` up to slice ``limit`` (inclusive); appends
    accepted slices to ``out``; yields progress; returns the :class:`Stop`."""
    j, before = prev.index + step, None
    while (j - limit) * step <= 0:
        embedding = _embedding_or_none(embeddings, j, cancel)
        if embedding is None or (cancel is not None and cancel.is_set()):
            return None
        predictor.set_embedding(embedding)
        shift = (0.0, 0.0)
        if strategy.follow_motion and before is not None:  # constant velocity
            shift = _centroid_xy(prev.mask) - _centroid_xy(before.mask)
        mask, score, logits = _predict(predictor, prev, strategy, shift)
        area, overlap = int(np.count_nonzero(mask)), iou(mask, prev.mask)
        if area < max(min_area, 1) or overlap < iou_threshold:  # an empty mask always stops
            return Stop(step, VANISHED if area < max(min_area, 1) else LOW_IOU, j, overlap, area)
        stats = SliceStats(j, area, overlap, score, "propagated")
        before, prev = prev, _Slice(j, mask, logits, stats)
        out.append(prev)
        yield PropagationProgress(j, step, len(out), area, overlap)
        j += step
    return Stop(step, end_reason)


def _check(embeddings, index: int, mask: np.ndarray, name: str) -> np.ndarray:
    n = len(embeddings)
    if not 0 <= index < n:
        raise ValueError(f"expected {name} index in [0, {n - 1}], got {index}")
    mask = np.asarray(mask)
    shape = tuple(getattr(embeddings, "original_size", mask.shape))
    if mask.shape != shape or not mask.any():
        raise ValueError(f"expected a non-empty {name} mask of shape {shape}, got shape "
                         f"{mask.shape} with {np.count_nonzero(mask)} pixels set")
    return mask.astype(bool)


def _own_predictor(predictor) -> SamPredictor:
    return SamPredictor(predictor.model if isinstance(predictor, SamPredictor) else predictor)


def _assemble(slices: list[_Slice], stops: list[Stop]) -> PropagationResult:
    slices = sorted(slices, key=lambda s: s.index)
    masks = np.stack([s.mask for s in slices])  # (K, H, W)
    return PropagationResult(slices[0].index, masks, tuple(s.stats for s in slices), tuple(stops))


def propagate(predictor, embeddings, start_index: int, start_mask: np.ndarray, *,
              strategy: str | PromptStrategy = DEFAULT_STRATEGY, iou_threshold: float = 0.5,
              min_area: int = 16, stop_range: tuple[int, int] | None = None,
              directions: tuple[int, ...] = (1, -1), start_logits: np.ndarray | None = None,
              cancel=None) -> Generator[PropagationProgress, None, PropagationResult | None]:
    """Segment the object of ``start_mask`` on the neighbouring slices, both ways.

    Args:
        predictor: :class:`SamPredictor` or model (a private predictor is used).
        embeddings: ``len()`` and ``embedding(i) -> ImageEmbedding`` (an
            :class:`~napari_sam.engine.store.EmbeddingStore` or
            :class:`~napari_sam.engine.stack.VolumeEmbeddings`).
        start_index: slice of ``start_mask`` along the stack axis.
        start_mask: (H, W) bool, the object on that slice (a preview or a committed label).
        strategy: see the module docstring; iou_threshold, min_area: stop criteria.
        stop_range: (low, high) inclusive slice indices not to go beyond.
        directions: (1,), (-1,) or both.
        start_logits: optional (1, 4He, 4We) SAM logits of ``start_mask`` (the preview's).
        cancel: optional ``threading.Event``; when set, returns None (an encode of a slice
            not yet cached stops within an encoder block: well under a second).
    Returns (as the generator's value): :class:`PropagationResult`, or None if cancelled.
    """
    strategy = PromptStrategy.parse(strategy)
    mask = _check(embeddings, start_index, start_mask, "start")
    n = len(embeddings)
    lo, hi = (0, n - 1) if stop_range is None else stop_range
    lo, hi = max(0, lo), min(n - 1, hi)
    if not lo <= start_index <= hi or set(directions) - {1, -1} or not directions:
        raise ValueError(f"expected start {start_index} inside stop_range {stop_range} and "
                         f"directions among (1, -1), got {directions}")
    predictor = _own_predictor(predictor)
    embedding = _embedding_or_none(embeddings, start_index, cancel)
    if embedding is None:
        return None
    predictor.set_embedding(embedding)
    start = _Slice(start_index, mask, start_logits,
                   SliceStats(start_index, int(mask.sum()), 1.0, float("nan"), "start"))
    slices, stops = [start], []
    for step in directions:
        limit = hi if step > 0 else lo
        reason = END if limit == (n - 1 if step > 0 else 0) else RANGE
        stop = yield from _walk(predictor, embeddings, start, step, limit, reason, strategy,
                                iou_threshold, min_area, cancel, slices)
        if stop is None:
            return None
        stops.append(stop)
    return _assemble(slices, stops)


def interpolate(predictor, embeddings, index_a: int, mask_a: np.ndarray, index_b: int,
                mask_b: np.ndarray, *, strategy: str | PromptStrategy = DEFAULT_STRATEGY,
                iou_threshold: float = 0.5, min_area: int = 16, cancel=None
                ) -> Generator[PropagationProgress, None, PropagationResult | None]:
    """Fill the slices between two annotated slices of one object.

    SAM propagates from each end towards the middle; if one side stops early the other
    goes on; slices neither reaches get the shape interpolation (signed distances) of the
    nearest kept masks (``source="interpolated"``). Arguments as :func:`propagate`;
    masks (H, W) bool. Returns slices ``min(a, b)…max(a, b)``, annotated ones unchanged.
    """
    strategy = PromptStrategy.parse(strategy)
    if index_a > index_b:
        index_a, mask_a, index_b, mask_b = index_b, mask_b, index_a, mask_a
    mask_a = _check(embeddings, index_a, mask_a, "first")
    mask_b = _check(embeddings, index_b, mask_b, "second")
    if index_b - index_a < 2:
        raise ValueError(f"expected annotated slices at least 2 apart, got {index_a} and {index_b}")
    predictor = _own_predictor(predictor)
    ends = [_Slice(i, m, None, SliceStats(i, int(m.sum()), 1.0, float("nan"), "annotated"))
            for i, m in ((index_a, mask_a), (index_b, mask_b))]
    mid = (index_a + index_b) // 2
    fwd, bwd, stops = [], [], []
    args = (strategy, iou_threshold, min_area, cancel)
    stop_f = yield from _walk(predictor, embeddings, ends[0], 1, mid, MET, *args, fwd)
    reach_f = fwd[-1].index if fwd else index_a
    stop_b = yield from _walk(predictor, embeddings, ends[1], -1, reach_f + 1, MET, *args, bwd)
    reach_b = bwd[-1].index if bwd else index_b
    if stop_f is not None and stop_b is not None and stop_f.reason == MET and reach_b > reach_f + 1:
        stop_f = yield from _walk(predictor, embeddings, fwd[-1] if fwd else ends[0], 1,
                                  reach_b - 1, MET, *args, fwd)
    if stop_f is None or stop_b is None:
        return None
    stops = [stop_f, stop_b]
    slices = ends + fwd + bwd
    have = {s.index: s for s in slices}
    for j in range(index_a + 1, index_b):
        if j not in have:  # a gap neither side reached: shape interpolation
            below = max(i for i in have if i < j)
            above = min(i for i in have if i > j)
            m = shape_interpolate(have[below].mask, have[above].mask, (j - below) / (above - below))
            slices.append(_Slice(j, m, None, SliceStats(j, int(m.sum()), float("nan"),
                                                        float("nan"), "interpolated")))
    return _assemble(slices, stops)
