"""Scale-out on Dask: tasks on a ``dask.distributed`` cluster, the model loaded once per worker.

The reusable layer (any command that runs per-item work on a cluster):

* :class:`ModelSpec`: how to build a model (name, checkpoint, decoder checkpoint, device,
  precision) — small and picklable, sent to the workers instead of the model;
* :func:`worker_model`: the model of a spec in *this* process, built on first use and kept:
  a worker builds it once, not once per task;
* :func:`open_cluster`: a ``Client`` of a ``LocalCluster`` of N worker processes (one
  thread each) or of an existing scheduler, closed on exit (Ctrl-C included);
* :func:`run_tasks`: submit ``function(task)`` for each task, yield results as tasks
  finish (progress across the cluster), cancel within a second, a failed task becomes one
  :class:`WorkerError` line.

Embedding stores on a cluster (``napari-sam embed --workers/--scheduler``):

* :func:`precompute_on_cluster`: the missing items of an
  :class:`~napari_sam.engine.store.EmbeddingStore` become tasks; each worker re-opens the
  input lazily (``StoreWork.open_stack``), attaches to the store
  (:meth:`EmbeddingStore.attach`: no re-hashing, the signature is checked) and runs the
  same ``store.put(item, store.encode_item(item))`` as an in-process precompute — one
  writer per chunk (its items' feature and flag chunks), so all results land in one zarr
  store, and a worker killed mid-task loses only its task (its flag stays -1 or its crc
  fails: recomputed by the next run).

``dask.distributed`` is imported only when a cluster is used.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

POLL_S = 0.2  # how often a waiting client checks ``cancel``
# Dask starts worker processes with MALLOC_TRIM_THRESHOLD_=65536, which turns glibc's
# dynamic mmap threshold off: every large torch buffer is then mmap'd and unmapped again —
# measured: 3x the page faults and ~40% more CPU per vit_t encode. Our workers run without
# it (their memory is the model's, not dask data to trim); OMP/MKL at 1 thread stay.
WORKER_ENV = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
_MODELS: dict[ModelSpec, Any] = {}
_STORES: OrderedDict[tuple, Any] = OrderedDict()
_LOCK = threading.Lock()


class WorkerError(RuntimeError):
    """A task failed on a worker (its exception, or the worker died too often); one line."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`~napari_sam.engine.build.build_sam` needs; the key of the
    per-process model cache. ``model``: a model name (or a frozen ``SamConfig``); paths
    are strings (sent to the workers, which must see the same files: a shared file system
    on a real cluster)."""

    model: Any = "vit_b"
    checkpoint: str | None = None
    decoder_checkpoint: str | None = None
    device: str = "auto"
    precision: str = "auto"

    def build(self):
        from .build import build_sam

        return build_sam(self.model, self.checkpoint, device=self.device, precision=self.precision,
                         decoder_checkpoint=self.decoder_checkpoint)


def worker_model(spec: ModelSpec):
    """The model of ``spec`` in this process: built on the first call, then the same object
    (one model per worker process and spec, whatever the number of tasks)."""
    with _LOCK:
        if spec not in _MODELS:
            _MODELS[spec] = spec.build()
        return _MODELS[spec]


# ---------------------------------------------------------------- clusters and tasks
@contextlib.contextmanager
def open_cluster(workers: int | None = None, scheduler: str | None = None,
                 threads_per_worker: int = 1) -> Iterator[Any]:
    """A ``dask.distributed.Client``: of a new ``LocalCluster`` of ``workers`` processes
    (``threads_per_worker`` threads each, no memory limit: a model is not dask data), or of
    the existing scheduler at ``scheduler`` ("tcp://host:8786"). Everything it started is
    closed on exit, also on Ctrl-C or an error.

    Raises:
        ValueError: neither or both of ``workers`` / ``scheduler``, or ``workers`` < 1.
        OSError: the scheduler cannot be reached (within 10 s).
    """
    if (workers is None) == (scheduler is None):
        raise ValueError(f"expected workers or scheduler, got workers={workers!r}, scheduler={scheduler!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"expected at least 1 worker, got {workers}")
    import logging

    import dask
    from distributed import Client, LocalCluster

    cluster = client = None
    try:
        if scheduler is not None:
            client = Client(scheduler, timeout="10s")
        else:  # our messages say what failed: the cluster's own logs stay quiet
            with _workers_ignore_ctrl_c(), warnings.catch_warnings(), dask.config.set(WORKER_ENV):
                # its HTTP server takes another port when 8787 is in use: nothing to report
                warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
                cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                       processes=True, memory_limit=0, dashboard_address=None,
                                       silence_logs=logging.CRITICAL, preload=[__name__])
            client = Client(cluster)
        yield client
    finally:
        for thing in (client, cluster):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Start worker processes with SIGINT ignored (an ignored signal is inherited across
    exec): Ctrl-C in a terminal reaches the whole process group, and the client — not each
    worker, with a traceback — stops the work and closes the cluster. A Ctrl-C during the
    start itself is ignored too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def dask_setup(worker) -> None:
    """Dask preload hook, run in each worker process of :func:`open_cluster` as it starts
    (restarted workers included): ignore SIGINT, as :func:`_workers_ignore_ctrl_c`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_tasks(client, function: Callable, tasks: Sequence, *, cancel: threading.Event | None = None
              ) -> Generator[tuple[int, Any], None, bool]:
    """Run ``function(task)`` on the cluster for every task (earlier tasks first).

    Yields ``(i, result)`` as each task ``i`` finishes (in completion order); returns True
    when all finished, False when ``cancel`` was set (checked every :data:`POLL_S` s; the
    tasks not yet finished are cancelled). Closing the generator (or Ctrl-C) cancels them
    too. A task whose finished result was lost with its worker is run again. A task that
    fails — an exception, or its worker died in it three times — cancels the rest and raises
    :class:`WorkerError` with one line.
    """
    from distributed import as_completed

    futures = [client.submit(function, task, pure=False, priority=-i) for i, task in enumerate(tasks)]
    index = {future.key: i for i, future in enumerate(futures)}
    pending = set(futures)
    try:
        finished = as_completed(futures)
        while pending:
            if cancel is not None and cancel.is_set():
                return False
            batch = finished.next_batch(block=False)
            if not batch:
                time.sleep(POLL_S)
                continue
            for future in batch:
                if future.status in ("error", "cancelled"):
                    raise WorkerError(_failure(future))
                if future.status != "finished":
                    # its result was lost with its worker (killed after the task ended, before
                    # the client fetched the result): the scheduler runs it again; wait for that
                    finished.add(future)
                    continue
                pending.discard(future)
                yield index[future.key], future.result()
        return True
    finally:
        if pending:
            with contextlib.suppress(Exception):
                client.cancel(list(pending))


def _failure(future) -> str:
    try:
        exc = future.exception(timeout=5)
    except Exception as err:  # noqa: BLE001 - cancelled, lost: say so
        exc = err
    if type(exc).__name__ == "KilledWorker":
        return ("a task failed: its worker process died each time it ran it (out of memory? "
                f"killed?): {one_line(exc)}")
    return f"a task failed on a worker: {one_line(exc)}"


# ---------------------------------------------------------------- embedding stores
@dataclass(frozen=True)
class StoreWork:
    """What a worker needs to write items into a store.

    ``path``: the store; ``signature_json``: its signature as the client opened it
    (workers do not hash the data again); ``open_stack``: a picklable callable returning the
    input array, read lazily (e.g. ``functools.partial(read_stack, path)``: workers get the
    input's path, never the array); ``model``: :class:`ModelSpec`; ``run``: an id of this
    piece of work (a worker attaches once per run: long-lived workers of a ``--scheduler``
    cluster never write through a store handle of an earlier run).
    """

    path: str
    signature_json: str
    open_stack: Callable[[], Any]
    model: ModelSpec
    run: str = ""

    @classmethod
    def of(cls, store, open_stack: Callable[[], Any], model: ModelSpec) -> StoreWork:
        import uuid

        return cls(str(store.path), json.dumps(store.signature, sort_keys=True), open_stack, model,
                   uuid.uuid4().hex)


def attached_store(work: StoreWork):
    """This process's :class:`~napari_sam.engine.store.EmbeddingStore` for ``work``:
    attached on first use (stack re-opened lazily, model from :func:`worker_model`), then
    kept (the last few)."""
    from .store import EmbeddingStore

    key = (work.path, work.signature_json, work.model, work.run)
    with _LOCK:
        store = _STORES.get(key)
    if store is None:
        store = EmbeddingStore.attach(work.path, work.open_stack(), worker_model(work.model),
                                      json.loads(work.signature_json))
        with _LOCK:
            _STORES[key] = store
            while len(_STORES) > 4:
                _STORES.popitem(last=False)
    return store


def encode_items(work: StoreWork, items: Sequence[int]) -> list[tuple[int, int]]:
    """Worker task: encode and store ``items`` (the engine's ``encode_item`` and ``put``,
    as an in-process precompute). Returns [(item, crc)]."""
    store = attached_store(work)
    done = []
    for item in items:
        store.put(int(item), store.encode_item(int(item)))
        done.append((int(item), int(store._done[int(item)])))
    return done


def _task(args: tuple[StoreWork, tuple[int, ...]]) -> list[tuple[int, int]]:
    return encode_items(*args)


def precompute_on_cluster(store, client, work: StoreWork, center: int = 0, *,
                          cancel: threading.Event | None = None, items_per_task: int = 1):
    """:meth:`EmbeddingStore.precompute` on a cluster: the missing items of ``store`` (in
    its order around ``center``), ``items_per_task`` per task, encoded and written by the
    workers. Yields :class:`~napari_sam.engine.store.PrecomputeProgress` as items land;
    returns :class:`~napari_sam.engine.store.PrecomputeResult` (``cancelled`` when
    ``cancel`` was set). The first write of a new store creates its features array, so it
    runs alone; then every item is a task on any worker.

    Raises:
        StoreError: at once, if the store is read-only.
        WorkerError: a task failed (e.g. a full disk); items stored before stay valid.
    """
    if items_per_task < 1:
        raise ValueError(f"expected items_per_task >= 1, got {items_per_task}")
    store._check_writable()
    return _precompute_on_cluster(store, client, work, center, cancel, items_per_task)


def _precompute_on_cluster(store, client, work, center, cancel, items_per_task):
    start, computed = time.perf_counter(), 0
    missing = store.missing_items(center)
    batches = [tuple(missing[i:i + items_per_task]) for i in range(0, len(missing), items_per_task)]
    rounds = [batches[:1], batches[1:]] if store._features is None else [batches]
    completed = True
    for batches in rounds:
        if not batches:
            continue
        jobs = run_tasks(client, _task, [(work, batch) for batch in batches], cancel=cancel)
        while True:
            try:
                _, stored = next(jobs)
            except StopIteration as stop:
                completed = stop.value
                break
            for item, crc in stored:
                store._note_stored(item, crc)
                computed += 1
                yield store.progress(item, computed)
        store.refresh()  # what the workers wrote (the features array after the first round)
        if not completed:
            break
    return store.result(computed, not completed, time.perf_counter() - start)
