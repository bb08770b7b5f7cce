"""The one job runner of the napari layer: an engine generator in a napari ``thread_worker``.

Every long piece of work (loading a model, encoding a slice, propagating, precomputing a
store, segmenting everything, opening a store) runs through :class:`JobRunner`:

* **inputs captured on the GUI thread**: the caller builds the generator (reading layers,
  contrast limits, parameters) before :meth:`JobRunner.start`; the worker thread only
  iterates it;
* **the start is painted first**: the status line and Stop button a job changes are
  repainted before its worker starts (:func:`paint_pending_now`);
* **progress**: on the widget's own bar and status line; napari's activity dock only for
  jobs that ask (``activity=True``: model downloads, tile encoding), because its animated
  "in progress" indicator repaints the whole window ~25 times a second, and where OpenGL is
  software (VMs, remote desktops, Xvfb) each repaint blocks the GUI thread ~80 ms while
  an encode runs (benchmarks/bench_gui_stall.py); a bar with no total shows 0 of 1, not an
  animated busy indicator, for the same reason;
* **cancel within a second**: :meth:`JobRunner.cancel` sets the job's ``threading.Event``
  (the engine generators check it); every step of the job runs under
  ``stop_when(cancel.is_set)``, so an encoder pass inside a step stops at its next block
  (``Stopped``, a cancelled outcome, never an error), else the runner stops at the next
  yield, closing the generator (engine generators write nothing before they return, so
  nothing is half done);
* **errors never escape**: an exception in the worker becomes a message on the status line
  and a napari notification, never a traceback or a dead process;
* **only current results are applied**: ``is_current()`` is asked on the GUI thread before
  ``on_done(result)``; a result whose inputs changed meanwhile is dropped, with a message;
* **closing cancels and joins**: :meth:`JobRunner.shutdown` (called when its widget is
  destroyed) cancels the job and waits for its thread to end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from psygnal import Signal

from ..engine.predictor import Stopped, stop_when


@dataclass
class _Outcome:
    """What the worker thread hands back to the GUI thread."""

    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False


@dataclass
class Job:
    """One running job: its worker, cancel flag and end-of-thread flag."""

    desc: str
    worker: Any
    cancel: threading.Event
    ended: threading.Event


def _iterate(gen: Generator, cancel: threading.Event, ended: threading.Event):
    """The worker body: forward ``gen``'s yields; each step runs under
    ``stop_when(cancel.is_set)``, so a long step (an encoder pass) stops within an encoder
    block once cancelled (:class:`~napari_sam.model.interrupt.Stopped`), else the job stops
    at its next yield; turn any exception into an :class:`_Outcome` (worker thread)."""
    try:
        while True:
            if cancel.is_set():
                gen.close()
                return _Outcome(cancelled=True)
            try:
                with stop_when(cancel.is_set):
                    item = next(gen)
            except StopIteration as stop:
                if cancel.is_set():  # cancelled at the last step: still nothing is applied
                    return _Outcome(cancelled=True)
                return _Outcome(result=stop.value)
            except Stopped:  # cancelled inside a step: the generator is finished, nothing applied
                return _Outcome(cancelled=True)
            yield item
    except Exception as exc:  # noqa: BLE001 - reported on the GUI thread, never raised
        return _Outcome(error=exc)
    finally:
        ended.set()


def as_generator(fn: Callable[[], Any]) -> Generator[None, None, Any]:
    """A one-step job: ``fn()`` (blocking) as a generator returning its result."""
    if False:  # pragma: no cover - makes this function a generator
        yield
    return fn()


class JobRunner:
    """Runs one job at a time for a widget.

    Args:
        report: ``report(message)`` shows a message to the user (status line).
        progress_bar: optional ``QProgressBar`` kept in step with the job, reset after it.

    Signals: ``busy_changed(bool)`` when a job starts or ends (GUI thread).
    """

    busy_changed = Signal(bool)

    def __init__(self, report: Callable[[str], None], progress_bar=None) -> None:
        self._report = report
        self._bar = progress_bar
        self.job: Job | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(
        self,
        gen: Generator | Callable[[threading.Event], Generator],
        *,
        desc: str,
        total: int = 0,
        on_yield: Callable[[Any], None] | None = None,
        on_done: Callable[[Any], Any] | None = None,
        on_cancel: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        is_current: Callable[[], bool] | None = None,
        cancel: threading.Event | None = None,
        activity: bool = False,
    ):
        """Run ``gen`` (a generator, or a function of the cancel event returning one) in a
        worker; ``on_done(result)`` runs on the GUI thread if ``is_current()`` still holds.
        ``activity``: also show it in napari's activity dock (see the module docstring).
        Returns the worker, or None when another job is running (the user is told)."""
        from napari.qt.threading import create_worker

        if self._closed:
            return None
        if self.job is not None:
            self._report(f"busy: {self.job.desc} is running (cancel it first)")
            return None
        cancel = cancel if cancel is not None else threading.Event()
        ended = threading.Event()
        if callable(gen) and not isinstance(gen, Generator):
            gen = gen(cancel)
        progress = {"desc": desc}
        if total:
            progress["total"] = int(total)
        worker = create_worker(_iterate, gen, cancel, ended, _start_thread=False,
                               _ignore_errors=True, _progress=progress if activity else None)
        job = Job(desc, worker, cancel, ended)
        if on_yield is not None:
            worker.yielded.connect(lambda item: self._guarded(job, on_yield, item))
        worker.returned.connect(
            lambda outcome: self._finish(job, outcome, on_done, on_cancel, on_error, is_current))
        # a failure of the thread machinery itself (the body never raises)
        worker.errored.connect(lambda exc: self._finish(job, _Outcome(error=exc), None, None, on_error, None))
        worker.finished.connect(lambda: self._release(job))
        if self._bar is not None:
            self._bar.setRange(0, max(int(total), 1))  # never 0, 0: an animated busy indicator
            self._bar.setValue(0)
        self.job = job
        try:  # a failing busy_changed slot or paint must not leave a job that never runs
            self.busy_changed.emit(True)
            paint_pending_now()  # before the worker takes the cores (see the function)
        finally:
            worker.start()  # it ends normally, which releases the job
        return worker

    def step(self, done: int, total: int | None = None) -> None:
        """Show progress ``done`` (of ``total``) on the widget's bar."""
        if self._bar is not None and not self._closed:
            if total is not None:
                self._bar.setRange(0, max(int(total), 1))
            self._bar.setValue(int(done))

    def activity(self, done: int, total: int, desc: str | None = None) -> None:
        """Show ``done`` of ``total`` (any unit, e.g. KiB) in napari's activity dock for the
        running job (its own bar counts yields otherwise)."""
        job = self.job
        pbar = getattr(job.worker, "pbar", None) if job is not None else None
        if pbar is None or self._closed:
            return
        # before update: napari's update processes Qt events, so a later step or the
        # job's end may run inside it and must not be overwritten by this older one
        if desc is not None:
            pbar.set_description(desc)
        if pbar.total != total:
            pbar.total = int(total)
        if done != pbar.n:
            pbar.update(int(done) - pbar.n)

    def _finish(self, job, outcome: _Outcome, on_done, on_cancel, on_error, is_current) -> None:
        if self._closed:
            return
        if outcome.error is not None:
            self._fail(job, outcome.error)
            if on_error is not None:
                on_error(outcome.error)
            self._release(job)  # after on_error: its state is set before "idle"
            return
        if outcome.cancelled:
            if on_cancel is not None:
                on_cancel()
            else:
                self._report(f"{job.desc}: cancelled, nothing changed")
            self._release(job)
            return
        self._release(job)  # before on_done: it may start the next job
        if is_current is not None and not is_current():
            self._report(f"{job.desc}: the image, layers or model changed meanwhile; result dropped")
        elif on_done is not None:
            try:
                on_done(outcome.result)
            except Exception as exc:  # noqa: BLE001 - a failed write is reported, not raised
                self._fail(job, exc)

    def _fail(self, job, exc: BaseException) -> None:
        """A job's failure: the status line and a napari notification."""
        message = f"{job.desc} failed: {exc}"
        self._report(message)
        notify_error(message)

    def _release(self, job) -> None:
        if self.job is job:
            self.job = None
            if self._bar is not None and not self._closed:
                self._bar.setRange(0, 1)
                self._bar.setValue(0)
            if not self._closed:
                self.busy_changed.emit(False)

    def _guarded(self, job, callback, item) -> None:
        """A progress callback on the GUI thread: only while ``job`` runs (a step that
        arrives after its end is dropped); a failure there is reported, not raised."""
        if self._closed or self.job is not job:
            return
        try:
            callback(item)
        except Exception as exc:  # noqa: BLE001
            self._report(f"progress display failed: {type(exc).__name__}: {exc}")

    def cancel(self) -> None:
        """Ask the running job to stop (within an encoder block, else at its next step)."""
        if self.job is not None:
            self.job.cancel.set()

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until no job runs (scripts, tests); False on timeout."""
        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + timeout
        while self.job is not None:
            if time.monotonic() > deadline:
                return False
            QApplication.processEvents()
            time.sleep(0.005)
        return True

    def shutdown(self, timeout: float = 3.0) -> bool:
        """Cancel the job, wait for its thread to end, and never apply its result (the
        widget is going away). True when no thread is left running."""
        self._closed = True
        job, self.job = self.job, None
        if job is None:
            return True
        job.cancel.set()
        return job.ended.wait(timeout)


def paint_pending_now() -> None:
    """Lay out and repaint, now, the widgets changed so far: a job's status line and Stop
    button before its worker starts, a click's preview before napari handles the release.

    A repaint of a napari window is a whole-window composition (the canvas is an OpenGL
    widget); with software OpenGL (VMs, remote desktops, Xvfb) it takes ~40 ms, and
    2-3x that once an encoder's torch threads hold every core: done here, it is not a
    GUI stall of the encode (benchmarks/bench_gui_stall.py). Only layout and update
    requests are delivered, so no user input or queued signal runs here.
    """
    from qtpy.QtCore import QCoreApplication, QEvent

    if QCoreApplication.instance() is None:
        return
    for _ in range(3):  # a relayout (a longer status text) posts one more repaint
        QCoreApplication.sendPostedEvents(None, QEvent.Type.LayoutRequest)
        QCoreApplication.sendPostedEvents(None, QEvent.Type.UpdateRequest)


def notify_error(message: str) -> None:
    """A napari error notification with our message (no traceback)."""
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # noqa: BLE001 - notifications are best effort (e.g. at shutdown)
        pass
