"""Decode ahead: the masks a click at the resting cursor would give, made before the click.

A person aims, rests the cursor on the object for a moment, then presses. The decoder costs
tens of milliseconds on a CPU; started when the cursor comes to rest, it has usually
finished by the press, which then only draws (:class:`DecodeAhead`).

One decode at a time, in one background thread, on a snapshot of the predictor
(:meth:`~napari_sam.engine.SamPredictor.snapshot`). Its result is used only for a prompt
equal to the one it was made for (the caller's decode key), so a wrong mask is never shown:
a press elsewhere, a changed prompt, slice or embedding decodes as without it. A press
that does not want the running decode stops it at its next stage (the decoder's stop
checks, :func:`~napari_sam.model.interrupt.stop_when`) and waits for that, so the click's
own decode does not share the cores with a guess nobody wants.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ..model.interrupt import stop_when

log = logging.getLogger(__name__)

# a background decode is tens of ms; waiting longer means something is wrong with it
WAIT_S = 5.0


class DecodeAhead:
    """At most one background decode, and the key it was made for. GUI-thread API."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._job: tuple[object, Future, threading.Event] | None = None
        self._closed = False

    @property
    def busy(self) -> bool:
        """A decode is running (a new one would wait for it)."""
        job = self._job
        return job is not None and not job[1].done()

    def has(self, key) -> bool:
        """A decode for ``key`` is running or finished (its result may still be taken)."""
        job = self._job
        return job is not None and job[0] == key

    def start(self, key, decode: Callable[[], object]) -> bool:
        """Run ``decode()`` in the background for ``key``, unless one is running, ``key``'s
        is already there, or it was closed. Returns True when started."""
        if self._closed or self.busy or self.has(key):
            return False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam-decode-ahead")
        stop = threading.Event()

        def run():
            with stop_when(stop.is_set):
                return decode()

        self._job = (key, self._executor.submit(run), stop)
        return True

    def take(self, key):
        """The result made for ``key`` (handed over once), or None: none made, made for
        another key (a running one is stopped), or it failed (the caller decodes and
        reports its own error). Returns only once no background decode runs."""
        job, self._job = self._job, None
        if job is None:
            return None
        made_for, future, stop = job
        if made_for != key:
            stop.set()
        try:
            failed = future.exception(timeout=WAIT_S) is not None
        except FutureTimeout:
            log.warning("a background decode did not end within %.0f s; decoding without it", WAIT_S)
            return None
        return None if failed or made_for != key else future.result()

    def forget(self) -> None:
        """Drop the result (it may hold an old model or image); a running decode is
        stopped and waited for by the next :meth:`take` or :meth:`start`."""
        job = self._job
        if job is None:
            return
        job[2].set()
        if job[1].done():
            self._job = None
        else:  # keep it until it ends: it must still be waited for
            job[1].add_done_callback(lambda _f, job=job: self._drop(job))

    def _drop(self, job) -> None:
        if self._job is job:  # (atomic under the GIL; runs in the worker thread)
            self._job = None

    def close(self) -> None:
        """Stop the running decode, wait for it and end the thread; later starts do nothing."""
        self._closed = True
        job, executor, self._job, self._executor = self._job, self._executor, None, None
        if job is not None:
            job[2].set()
        if executor is not None:
            executor.shutdown(wait=True)
