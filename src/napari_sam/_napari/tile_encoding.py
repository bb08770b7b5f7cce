"""Background encoding of a tiled plane, nearest-first: :class:`TileEncoder`.

A large plane is never encoded whole before the first mask. The tiles wanted are, in this
order: the tiles under the prompts (newest object first), then the tiles in view, nearest
the view's centre first (at most as many as the cache keeps). One job of the shared job
runner encodes them one at a time and re-reads the order after each tile, so a new prompt
goes to the front; if a tile in view is being encoded when a prompt needs another one, that
encode is stopped within an encoder block (``Stopped``) and the prompt's tile comes next.
So a click on a 20000 x 20000 image gives a mask after ONE tile encode.

Each finished tile is in the session's cache at once; ``on_tile(k)`` is called on the GUI
thread (the segmenter decodes as soon as its prompts' tiles are there). Cancel stops the
job within a block and pauses background encoding until the next prompt or request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..engine.predictor import Stopped
from .geometry import to_rc


class _Either:
    """``is_set()`` of any of several events (what the encoder's stop check reads)."""

    def __init__(self, *events) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class TileEncoder:
    """Keeps the tiles that matter of the shown tiled plane encoded.

    Args:
        runner: the :class:`~napari_sam._napari.jobs.JobRunner` (shared with the slice
            encoder: one encode at a time).
        report: ``report(message)`` for the user; on_tile: ``on_tile(k)`` after tile k.
    Attributes: ``source`` (the shown plane's :class:`~napari_sam._napari.tiles.TileSource`
    or None), ``paused`` (after a cancel: only prompts start encodes).
    """

    def __init__(self, runner, report: Callable[[str], None], on_tile: Callable[[int], None]) -> None:
        self.runner, self._report, self._on_tile = runner, report, on_tile
        self.source = None
        self.paused = False
        self.failed = None
        self._lock = threading.Lock()
        self._order: list[int] = []
        self._urgent: set[int] = set()
        self._encoding: int | None = None
        self._preempt = threading.Event()
        runner.busy_changed.connect(self._on_busy_changed)

    # ------------------------------------------------------------------ GUI thread
    def set_source(self, source) -> None:
        """Work on ``source`` (a TileSource; None: no tiled plane is shown)."""
        if source is not None and source.same_as(self.source):
            return
        with self._lock:
            self.source, self._order, self._urgent = source, [], set()
            if self._encoding is not None:
                self._preempt.set()  # a tile of another plane: stop it
        self.failed = None

    def want(self, prompt_tiles=(), view_tiles=(), resume: bool = False) -> None:
        """Set what to encode: ``prompt_tiles`` first, then ``view_tiles``; start (or steer)
        the job. A tile in view being encoded gives way to a prompt's tile that is not
        cached yet. While paused (after :meth:`cancel`) nothing is encoded unless
        ``resume`` (a new prompt, an explicit request)."""
        prompt_tiles = [int(k) for k in prompt_tiles]
        if resume:
            self.paused, self.failed = False, None
        with self._lock:
            self._order = [] if self.paused else list(dict.fromkeys([*prompt_tiles, *view_tiles]))
            self._urgent = set(prompt_tiles)
            busy = self._encoding
        source = self.source
        if source is None:
            return
        missing_urgent = [k for k in prompt_tiles if source.cached(k) is None]
        if busy is not None and busy not in self._urgent and missing_urgent:
            self._preempt.set()
        self._start()

    def cancel(self) -> None:
        """Stop encoding (within a block) and pause until the next prompt or request."""
        self.paused = True
        with self._lock:
            self._order = [k for k in self._order if k in self._urgent]
        if self.runner.running:
            self.runner.cancel()

    def wanted(self) -> list[int]:
        """The tiles wanted now, in encoding order."""
        with self._lock:
            return list(self._order)

    @property
    def pending(self) -> int:
        """How many wanted tiles are not encoded yet."""
        source = self.source
        if source is None:
            return 0
        with self._lock:
            order = list(self._order)
        return sum(source.cached(k) is None for k in order)

    def _start(self) -> None:
        source = self.source
        if source is None or self.runner.running or self._next(source) is None or self.failed is source:
            return
        self._report(f"encoding tiles of '{source.source.name}': under your prompts first, then in view")
        self.runner.start(lambda cancel: self._job(source, cancel),
                          desc=f"SAM: encoding tiles of '{source.source.name}'",
                          on_yield=self._on_yield, on_done=lambda n: None, on_error=self._on_error,
                          on_cancel=lambda: self._report("tile encoding stopped (prompts start it again)"),
                          activity=True)

    def _on_yield(self, item) -> None:
        source, k = item
        if source is not self.source:
            return
        with self._lock:
            total = len(self._order)
        done = total - self.pending
        self.runner.activity(done, max(total, 1), f"SAM: encoding tiles of '{source.source.name}'")
        self._on_tile(k)

    def _on_error(self, exc) -> None:
        self.failed = self.source

    def _on_busy_changed(self, busy: bool) -> None:
        if not busy and not self.paused:
            self._start()  # what was wanted meanwhile (or by another job's end)

    # ------------------------------------------------------------------ worker thread
    def _next(self, source) -> int | None:
        with self._lock:
            if source is not self.source:
                return None
            return next((k for k in self._order if source.cached(k) is None), None)

    def _job(self, source, cancel: threading.Event):
        """Encode wanted tiles until none is left (yields ``(source, k)`` after each)."""
        while not cancel.is_set():
            k = self._next(source)
            if k is None:
                return None
            with self._lock:
                self._encoding = k
                self._preempt.clear()
                urgent = k in self._urgent
            try:
                source.embedding(k, cancel if urgent else _Either(cancel, self._preempt))
            except Stopped:
                if cancel.is_set():
                    return None
                continue  # gave way to a prompt's tile
            finally:
                with self._lock:
                    self._encoding = None
            yield source, k
        return None

    def encode_now(self, tiles) -> None:
        """Encode ``tiles`` in this thread (scripts: ``wait=True``)."""
        source = self.source
        if source is not None:
            for k in tiles:
                source.embedding(int(k))


def tiles_in_view(viewer, source, plane, grid, limit: int) -> list[int]:
    """Indices of the tiles of ``plane`` in the viewer's canvas, nearest the view's centre
    first (at most ``limit``); [] when the view shows none of the plane."""
    dims, camera = viewer.dims, viewer.camera
    size_hw = np.asarray(getattr(getattr(viewer, "canvas", None), "size", (600, 800)), float)
    half = size_hw / (2.0 * max(float(camera.zoom), 1e-12))  # world units
    centre = np.asarray(camera.center, float)[-2:]
    rows_axis, cols_axis = dims.displayed[-2:]
    corners = []
    for dr in (-1, 1):
        for dc in (-1, 1):
            world = np.asarray(dims.point, float).copy()
            world[rows_axis], world[cols_axis] = centre[0] + dr * half[0], centre[1] + dc * half[1]
            corners.append(np.asarray(source.world_to_data(world), float))
    rc = to_rc(np.stack(corners), plane)  # (4, 2) plane (row, col)
    (r0, c0), (r1, c1) = rc.min(axis=0), rc.max(axis=0)
    h, w = plane.shape_hw
    if r1 < 0 or c1 < 0 or r0 >= h or c0 >= w:
        return []
    mid = np.array([(r0 + r1) / 2, (c0 + c1) / 2])
    seen = []
    for tile in grid.tiles:
        i0, i1, j0, j1 = tile.inner_rc
        if i1 > r0 and i0 <= r1 and j1 > c0 and j0 <= c1:
            centre_rc = np.array([(i0 + i1) / 2, (j0 + j1) / 2])
            seen.append((float(np.hypot(*(centre_rc - mid))), tile.index))
    return [k for _, k in sorted(seen)][:limit]


__all__ = ["TileEncoder", "tiles_in_view"]
