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


def cluster_stack_job(client, work: SliceWork, out, *, link_iou: float = 0.25, store=None,
                      cancel: threading.Event | None = None) -> Generator[Any, None, Any]:
    """The stack segmented on ``client``'s cluster into ``out`` ((N, H, W) array-like): one
    task per slice, linked here in slice order as they finish. Yields
    :class:`~napari_sam.engine.automatic.Progress` (slices done across the cluster);
    returns ``out``, or None when ``cancel`` was set.

    Raises:
        WorkerError: a task failed (one line).
    """
    import zarr

    from ..engine.automatic import Progress
    from ..engine.distributed import run_tasks
    from ..engine.label_image import link_slice

    n = int(out.shape[0])
    scratch = zarr.open_array(work.scratch, mode="r")
    tasks = [(work, z, stored_items(store, z)) for z in range(n)]
    landed, linked, prev, next_id = set(), 0, None, 1
    yield Progress(0, n, f"{n} slices on the cluster")
    jobs = run_tasks(client, segment_slice, tasks, cancel=cancel)
    try:
        while True:
            try:
                z, _ = next(jobs)
            except StopIteration as stop:
                finished = stop.value
                break
            landed.add(z)
            while linked in landed:  # link every slice whose predecessors are linked
                prev, next_id = link_slice(prev, np.asarray(scratch[linked]), next_id, link_iou)
                out[linked] = prev.astype(np.uint32)
                linked += 1
            yield Progress(len(landed), n, f"slice {z + 1}/{n} done on the cluster, {linked} linked")
    finally:
        jobs.close()
    return out if finished and linked == n else None


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
                labels, target) -> Iterator[Generator]:
    """The cluster run of ``napari-sam everything`` as a job writing into ``labels``; the
    cluster and the temporary slice array (beside ``target``) are closed / removed on exit."""
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
        _create(scratch, tuple(labels.shape), chunks, {})
        work = SliceWork(open_stack, spec, segmenter.mode, options, limits, tiling, str(scratch),
                         None if store is None else StoreWork.of(store, open_stack, spec))
        with open_cluster(workers=args.workers, scheduler=args.scheduler) as client:
            yield cluster_stack_job(client, work, labels, link_iou=args.link_iou, store=store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
