"""Stopping a long forward pass between its stages, so that Cancel acts within a second.

An image encoder pass takes seconds on a CPU (vit_b: 12 blocks of ~0.5 s each). Rather
than thread a callback through every ``forward`` signature (which must stay the
reference's), the encoders call :func:`raise_if_stopped` between blocks, and a caller
that can be cancelled wraps the pass in :func:`stop_when`::

    with stop_when(cancel.is_set):
        features = model.encode(x)      # raises Stopped soon after cancel is set

The check is per thread: a worker thread's cancel never stops the GUI thread's pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


class Stopped(Exception):
    """A forward pass stopped early because its stop check returned True."""


@contextmanager
def stop_when(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, passes of this thread stop (raise :class:`Stopped`) at their next
    stage boundary once ``should_stop()`` is True, or the check of an enclosing
    ``stop_when`` is (nested checks add up: an inner cancel never hides a job's). None: no
    check of its own (the enclosing ones still apply)."""
    previous = getattr(_local, "check", None)
    if should_stop is not None and previous is not None:
        _local.check = lambda: should_stop() or previous()
    elif should_stop is not None:
        _local.check = should_stop
    try:
        yield
    finally:
        _local.check = previous


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` if this thread's stop check (see :func:`stop_when`) says so."""
    check = getattr(_local, "check", None)
    if check is not None and check():
        raise Stopped()


class StopCheck:
    """For a job that runs as a generator (where a ``stop_when`` block cannot stay open
    across its yields): calling it raises :class:`Stopped` once ``cancel`` (a
    ``threading.Event``, or None) is set or this thread's :func:`stop_when` check says so.

    ``cancel`` stays available to pass on (e.g. ``encode_image(cancel=check.cancel)``).
    """

    def __init__(self, cancel=None) -> None:
        self.cancel = cancel

    def __call__(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Stopped()
        raise_if_stopped()
