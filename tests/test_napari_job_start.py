"""A job's start is painted before its worker runs.

With software OpenGL a repaint of the napari window costs tens of milliseconds, and 2-3x
that once an encoder's torch threads hold every core; the widget therefore repaints the
job's status line and Stop button before its worker starts (benchmarks/bench_gui_stall.py
measures the stall). Nothing is timed here: the test counts the window's repaints that had
happened when the worker's first step began, with the GUI thread kept out of its event loop
meanwhile, so only a repaint done inside the start can be counted.
"""

from __future__ import annotations

import threading

import numpy as np
from conftest import dock


def test_the_encoding_status_is_painted_before_the_encoder_runs(viewer, qtbot, tiny_sam, monkeypatch):
    from qtpy.QtCore import QEvent, QObject

    window = viewer.window._qt_window
    repaints = []
    widget = None  # the filter sees repaints before the widget is docked

    class CountRepaints(QObject):
        def eventFilter(self, obj, event):  # noqa: N802 - Qt's name
            if event.type() == QEvent.Type.UpdateRequest and widget is not None:
                repaints.append(widget.status)
            return False

    counter = CountRepaints()
    window.installEventFilter(counter)
    try:
        viewer.add_image(np.random.default_rng(0).random((64, 80)).astype(np.float32), name="image")
        widget = dock(viewer, "Segment Anything")
        widget.segmenter.auto_encode = False
        widget.set_model(tiny_sam)
        qtbot.wait(50)  # the docking's own repaints

        session = widget.session
        encode_job = session.encode_job
        first_step = threading.Event()
        seen_at_first_step = []

        def observed_encode_job(layer, plane):
            key, job = encode_job(layer, plane)

            def observed():
                seen_at_first_step.extend(repaints)  # worker thread: what was painted by now
                first_step.set()
                return (yield from job)

            return key, observed()

        monkeypatch.setattr(session, "encode_job", observed_encode_job)
        repaints.clear()
        widget.segmenter.request_encoding()
        assert widget.segmenter.encoding
        # the GUI thread stays out of its event loop: a repaint counted now happened in start()
        assert first_step.wait(20)
        qtbot.waitUntil(lambda: widget.segmenter.embedding_ready, timeout=30000)
    finally:
        window.removeEventFilter(counter)
    assert seen_at_first_step, "the window was not repainted before the encoder started"
    assert any("encoding" in status for status in seen_at_first_step), seen_at_first_step


def test_a_failing_busy_slot_still_runs_the_job_and_ends_idle(qtbot):
    """An exception in a busy_changed slot (or in the paint) at the start does not leave the
    runner busy with a worker that never runs."""
    import pytest

    from napari_sam._napari.jobs import JobRunner, as_generator

    runner, results = JobRunner(lambda message: None), []

    def failing_slot(busy):
        if busy:
            raise RuntimeError("slot failed")

    runner.busy_changed.connect(failing_slot)
    with pytest.raises(Exception, match="slot failed"):
        runner.start(as_generator(lambda: 42), desc="job", on_done=results.append)
    assert runner.wait(30)
    assert results == [42] and not runner.running


def test_an_activity_step_inside_napari_update_is_not_overwritten():
    """napari's progress update processes Qt events: a later step handled inside it keeps
    its description (the outer, older call does not set its own afterwards)."""
    from napari_sam._napari.jobs import Job, JobRunner

    runner = JobRunner(lambda message: None)

    class Bar:
        total, n, desc = 0, 0, None

        def update(self, k):
            self.n += k
            if self.n < 10:  # the later step arrives while this update processes events
                runner.activity(10, 10, "step 2")

        def set_description(self, desc):
            self.desc = desc

    class Worker:
        pbar = Bar()

    runner.job = Job("job", Worker(), threading.Event(), threading.Event())
    runner.activity(5, 10, "step 1")
    assert (Worker.pbar.n, Worker.pbar.desc) == (10, "step 2")
