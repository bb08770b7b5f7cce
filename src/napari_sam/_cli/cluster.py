"""``napari-sam everything --workers N / --scheduler ADDRESS``: slices as tasks on Dask.

Each task runs the in-process path on one slice — ``SamInstanceSegmenter.stack_job`` on a
one-slice view of the input, so segmentation, tiling and stitching are the same functions —
in a worker that loads the model once (:func:`~napari_sam.engine.distributed.worker_model`)
and re-opens the input lazily from its path. It writes the slice's labels into a temporary
zarr array beside the output (one writer per chunk: a chunk never spans two slices). The
client links the slices in order as they land (``link_slice``: two slices in memory) and
writes the linked labels into the output. Tasks run earliest slice first; a worker killed
mid-task loses only that task (the cluster runs it again elsewhere). With ``--store``, a
worker reads the slice's stored embeddings (the client tells it which items are stored)
and encodes and stores the missing ones itself.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .files import AxisView

_CACHE: dict[str, tuple] = {}  # per worker process: scratch path -> (segmenter, stack)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SliceWork:
    """What a worker needs to segment any slice of one run (small, picklable).

    Attributes:
        open_stack: returns the (N, H, W[, C]) input, read lazily (the path, not the array).
        model: the :class:`~napari_sam.engine.distributed.ModelSpec`.
        mode, options: the segmenter's mode and keyword arguments (see everything.py).
        contrast_limits: one (low, high) for the stack, or None.
        tiling: keyword arguments of ``stack_job``'s tiling (tiling, tile_shape, halo, grid).
        scratch: path of the (N, H, W) uint32 zarr array receiving each slice's labels.
        store: the embedding store's ``StoreWork``, or None.
    """

    open_stack: Callable[[], Any]
    model: Any
    mode: str
    options: dict
    contrast_limits: tuple[float, float] | None
    tiling: dict
    scratch: str
    store: Any = None


def _worker_state(work: SliceWork):
    """(segmenter, stack) of ``work`` in this process, made on its first task."""
    from ..engine.distributed import worker_model
    from ..engine.instances import SamInstanceSegmenter

    with _LOCK:
        if work.scratch not in _CACHE:
            _CACHE.clear()  # one run at a time per worker: drop the previous run's
            segmenter = SamInstanceSegmenter(worker_model(work.model), work.mode, **work.options)
            _CACHE[work.scratch] = (segmenter, work.open_stack())
        return _CACHE[work.scratch]


def segment_slice(task: tuple[SliceWork, int, dict[int, int]]) -> int:
    """Worker task: slice ``z`` of the input segmented and written into the scratch array;
    ``stored`` ({item: crc}) names the store's items the client saw stored. Returns the
    number of objects of the slice."""
    import zarr

    from ..engine.automatic import run_to_end

    work, z, stored = task
    segmenter, stack = _worker_state(work)
    embedding_for = None
    if work.store is not None:
        from ..engine.distributed import attached_store

        store = attached_store(work.store)
        for item, crc in stored.items():
            store._note_stored(item, crc)  # flags are not re-read by attached stores
        if store.grid is None:
            embedding_for = lambda _: store.embedding(z)
        else:
            embedding_for = lambda _: (lambda k: store.tile_embedding(z, k))
    out = AxisView(zarr.open_array(work.scratch, mode="r+"), {0: z}, new_axis=True)
    job = segmenter.stack_job(AxisView(stack, {0: z}, new_axis=True), out=out,
                              contrast_limits=work.contrast_limits, embedding_for=embedding_for,
                              **work.tiling)
    run_to_end(job)
    return int(out[0].max())


def stored_items(store, z: int) -> dict[int, int]:
    """{item: crc} of slice ``z``'s items that ``store`` (the client's) holds."""
    if store is None:
        return {}
    items = [store.item(z, k) for k in range(store.n_tiles)]
    return {int(i): int(store._done[i]) for i in items if store._done[i] >= 0}


def _in_order(client, function, tasks, consume: Callable[[int], None], what: str,
              cancel: threading.Event | None) -> Generator[Any, None, bool]:
    """Run ``function`` on every task on the cluster; ``consume(i)`` each task's result in
    task order as soon as it and all before it have landed. Yields Progress; returns
    whether every task was consumed (False: cancelled)."""
    from ..engine.automatic import Progress
    from ..engine.distributed import run_tasks

    n, landed, consumed = len(tasks), set(), 0
    yield Progress(0, n, f"{n} {what}s on the cluster")
    jobs = run_tasks(client, function, tasks, cancel=cancel)
    try:
        while True:
            try:
                i, _ = next(jobs)
            except StopIteration as stop:
                finished = stop.value
                break
            landed.add(i)
            while consumed in landed:
                consume(consumed)
                consumed += 1
            yield Progress(len(landed), n, f"{what} {i + 1}/{n} done on the cluster")
    finally:
        jobs.close()
    return bool(finished) and consumed == n


def cluster_stack_job(client, work: SliceWork, out, *, link_iou: float = 0.25, store=None,
                      cancel: threading.Event | None = None) -> Generator[Any, None, Any]:
    """The stack segmented on ``client``'s cluster into ``out`` ((N, H, W) array-like): one
    task per slice, linked here in slice order as they land (two slices in memory). Yields
    :class:`~napari_sam.engine.automatic.Progress` (slices done across the cluster);
    returns ``out``, or None when ``cancel`` was set.

    Raises:
        WorkerError: a task failed (one line).
    """
    import zarr

    from ..engine.label_image import link_slice

    scratch = zarr.open_array(work.scratch, mode="r")
    state = {"prev": None, "next_id": 1}

    def link(z: int) -> None:
        state["prev"], state["next_id"] = link_slice(state["prev"], np.asarray(scratch[z]),
                                                     state["next_id"], link_iou)
        out[z] = state["prev"].astype(np.uint32)

    tasks = [(work, z, stored_items(store, z)) for z in range(int(out.shape[0]))]
    done = yield from _in_order(client, segment_slice, tasks, link, "slice", cancel)
    return out if done else None


def segment_tile(task: tuple[SliceWork, int, dict[int, int]]) -> int:
    """Worker task: tile ``k`` of a single image (its stored embedding, or encoded from its
    pixels with the run's one normalisation) segmented as an image of its own, its labels
    written into the scratch array's item k. Returns its number of objects."""
    import zarr

    from ..engine.automatic import run_to_end
    from ..engine.tiled_predictor import encode_tile
    from ..engine.tiling import read_tile

    work, k, stored = task
    segmenter, stack = _worker_state(work)
    plane, tile = AxisView(stack, {0: 0}), work.tiling["grid"].tiles[k]
    if work.store is not None:
        from ..engine.distributed import attached_store

        store = attached_store(work.store)
        for item, crc in stored.items():
            store._note_stored(item, crc)
        embedding = store.tile_embedding(0, k)
    else:
        embedding = encode_tile(segmenter.predictor, plane, tile, work.contrast_limits)
    pixels = read_tile(plane, tile) if segmenter.mode == "amg" else None
    scratch = zarr.open_array(work.scratch, mode="r+")
    if pixels is not None and pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
        return 0  # an all-NaN tile holds no objects (as in process)
    result = run_to_end(segmenter.job(pixels, embedding=embedding, contrast_limits=work.contrast_limits))
    scratch[k] = result.labels.astype(np.uint32)
    return int(result.labels.max(initial=0))


def cluster_tiles_job(client, work: SliceWork, segmenter, out, *, store=None,
                      cancel: threading.Event | None = None) -> Generator[Any, None, Any]:
    """A single large image segmented on ``client``'s cluster into ``out`` ((H, W)
    array-like): one task per tile, stitched here in grid order as they land
    (:class:`~napari_sam.engine.stitching.TileStitcher`, as in process). Returns an
    :class:`~napari_sam.engine.instances.InstanceSegmentation` (``count`` = objects), or
    None when cancelled."""
    import zarr

    from ..engine.instances import InstanceSegmentation
    from ..engine.stitching import TileStitcher

    grid = work.tiling["grid"]
    scratch = zarr.open_array(work.scratch, mode="r")
    min_size = segmenter.amg_min_size if segmenter.mode == "amg" else 0
    stitcher = TileStitcher(out, grid, min_overlap=segmenter.stitch_overlap, min_size=min_size)
    tasks = [(work, k, stored_items(store, 0)) for k in range(len(grid))]
    done = yield from _in_order(client, segment_tile, tasks,
                                lambda k: stitcher.add(grid.tiles[k], np.asarray(scratch[k])), "tile", cancel)
    return InstanceSegmentation(out, segmenter.mode, None, stitcher.finish()) if done else None


def add_cluster_arguments(parser) -> None:
    """--workers / --scheduler (no import of dask here)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, metavar="N",
                       help="segment slices on a local Dask cluster of N worker processes")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="segment slices on an existing Dask cluster (e.g. tcp://host:8786); "
                            "its workers must see INPUT, the output folder and the checkpoint")


def check_cluster_arguments(args) -> bool:
    """Whether the run goes to a cluster; ValueError for a bad --workers."""
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"expected --workers N with N >= 1, got {args.workers}")
    return args.workers is not None or args.scheduler is not None


@contextlib.contextmanager
def cluster_job(args, open_stack, segmenter, options: dict, limits, tiling: dict, store,
                labels, target, plane=None) -> Iterator[Generator]:
    """The cluster run of ``napari-sam everything`` as a job writing into ``labels`` ((N,
    H, W)), or with ``plane`` (an (H, W) output) a single tiled image's tiles as tasks; the
    cluster and the temporary array (beside ``target``) are closed / removed on exit."""
    from pathlib import Path

    from ..engine.distributed import ModelSpec, StoreWork, open_cluster
    from .label_outputs import _create, _temporary

    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    spec = ModelSpec(args.model, absolute(args.checkpoint), absolute(args.decoder_checkpoint),
                     args.device, args.precision)
    scratch = _temporary(Path(target), "slices.zarr").resolve()
    try:
        grid = tiling.get("grid")
        chunks = grid.tile_hw if grid is not None else tuple(labels.shape[1:])
        shape = (len(grid), *grid.tile_hw) if plane is not None else tuple(labels.shape)
        _create(scratch, shape, chunks, {})
        work = SliceWork(open_stack, spec, segmenter.mode, options, limits, tiling, str(scratch),
                         None if store is None else StoreWork.of(store, open_stack, spec))
        with contextlib.ExitStack() as context:
            try:
                client = context.enter_context(open_cluster(workers=args.workers, scheduler=args.scheduler))
            except OSError as exc:  # e.g. no scheduler at that address
                where = f"the Dask scheduler {args.scheduler}" if args.scheduler else "a local Dask cluster"
                raise RuntimeError(f"cannot reach {where}: {exc}") from None
            if plane is not None:
                yield cluster_tiles_job(client, work, segmenter, plane, store=store)
            else:
                yield cluster_stack_job(client, work, labels, link_iou=args.link_iou, store=store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
