"""Decode ahead: the masks a click at the resting cursor would give, made before the click.

A person aims, rests the cursor on the object for a moment, then presses. The decoder costs
tens of milliseconds on a CPU; started when the cursor comes to rest, it has usually
finished by the press, which then only draws (:class:`DecodeAhead`).

One decode at a time, in one background thread; its result is used only for a prompt equal
to the one it was made for (the caller's decode key), so a wrong mask is never shown: a
press elsewhere, a changed prompt, slice or embedding simply decodes as without it. Any
decode on the GUI thread first waits for the one in flight (:meth:`DecodeAhead.take`), so
the predictor is never used by two threads at once, and the cores are not split between a
stale guess and the click.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class DecodeAhead:
    """At most one background decode, and the key it was made for."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._job: tuple[object, Future] | None = None
        self._lock = threading.Lock()  # close() may race a start() from a timer

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
        """Run ``decode()`` in the background for ``key``, unless one is running or
        ``key``'s is already there. Returns True when started."""
        with self._lock:
            if self.busy or self.has(key):
                return False
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam-decode-ahead")
            self._job = (key, self._executor.submit(decode))
            return True

    def take(self, key):
        """The result made for ``key``, or None (none made, another key, or it failed:
        the caller decodes itself and reports its own error). Waits for a running
        decode, whatever its key (see the module's docstring)."""
        job = self._job
        if job is None:
            return None
        if job[1].exception() is not None or job[0] != key:  # .exception() waits
            return None
        return job[1].result()

    def forget(self) -> None:
        """Drop a finished result (a running one stays, so :meth:`take` still waits)."""
        with self._lock:
            if not self.busy:
                self._job = None

    def close(self) -> None:
        """Wait for the running decode and stop the thread."""
        with self._lock:
            executor, self._executor, self._job = self._executor, None, None
        if executor is not None:
            executor.shutdown(wait=True)
