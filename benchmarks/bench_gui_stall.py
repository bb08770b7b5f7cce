"""GUI-thread stalls while the Segment Anything widget encodes in the background.

    xvfb-run -a .venv/bin/python benchmarks/bench_gui_stall.py [--write]
        [--models vit_b vit_t] [--size 1024] [--repeats 3]

The widget is docked as users get it (``add_plugin_dock_widget``) in a shown viewer with a
1024 x 1024 image; a model with random weights (an encode's cost does not depend on them).
A 10 ms ``QTimer`` on the GUI thread records when it fires while the widget's background
encode runs (the real Qt event loop, not a polling loop); the gaps between firings beyond
its 10 ms period are what a user feels as a frozen viewer (measured from the request to
300 ms after the job ended: the result is applied then). Reports the largest gap, the
99th percentile gap and the encode's wall time, for each way of running the worker:

* ``activity dock (before)``: the job also in napari's activity dock, as every job was
  before: its animated "in progress" indicator repaints the window ~25 times a second;
* ``plain``: the job runner's default: the worker at the GUI's priority, all torch threads.

Two more variants were measured once (BENCHMARKS.md, gui-stall) and then removed with their
settings: the worker at nice 10, and one torch thread fewer than cores; neither shortened
the largest gap, and nice made the encode up to 2.3x slower on a busy machine.

Variants alternate within one process (``--repeats`` rounds); each figure is the median
over the rounds. ``--write`` updates BENCHMARKS.md (section gui-stall).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from bench_widget_latency import build_model, make_image
from common import cpu_name, write_section

VARIANTS = ("activity dock (before)", "plain")


def configure(variant: str, runner) -> None:
    """Show the slice encoder's jobs (``runner``) in napari's activity dock for the
    "before" row only."""
    import functools

    from napari_sam._napari import jobs

    runner.__dict__.pop("start", None)
    if variant == "activity dock (before)":
        runner.start = functools.partial(jobs.JobRunner.start, runner, activity=True)


def timed_encode(widget, period_ms: int = 10) -> dict:
    """One background encode of the shown slice, with a ``period_ms`` QTimer on the GUI
    thread; returns its gaps (ms) and the encode's wall time (s)."""
    from qtpy.QtCore import QEventLoop, QTimer

    seg = widget.segmenter
    widget.session.cache.invalidate()
    seg.encoder.reset()
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(period_ms)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    loop = QEventLoop()
    done = {"t": None}

    def on_busy(busy: bool) -> None:
        if not busy:
            done["t"] = time.perf_counter()
            loop.quit()

    seg.encoder.runner.busy_changed.connect(on_busy)
    timer.start()
    t0 = time.perf_counter()
    ticks.append(t0)
    seg.request_encoding()
    if not seg.encoding:
        raise RuntimeError("the encode did not start in the background")
    run_loop = loop.exec if hasattr(loop, "exec") else loop.exec_
    run_loop()
    QTimer.singleShot(300, loop.quit)  # and what the GUI thread does with the result
    run_loop()
    end = time.perf_counter()
    timer.stop()
    seg.encoder.runner.busy_changed.disconnect(on_busy)
    if not seg.embedding_ready:
        raise RuntimeError(f"the encode did not finish: {widget.status}")
    times = np.array(ticks + [end])
    gaps = np.diff(times) * 1000
    worst = int(np.argmax(gaps))
    return {"max": float(gaps.max()), "p99": float(np.percentile(gaps, 99)), "encode_s": done["t"] - t0,
            "max_at_s": float(times[worst] - t0)}


def run(models: list[str], size: int, repeats: int) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    results = {}
    try:
        layer = viewer.add_image(make_image(size), name="image")
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
        widget.segmenter.auto_encode = False
        for model_type in models:
            widget.set_model(build_model(model_type, "auto"))
            widget.set_image_layer(layer)
            for _ in range(20):
                QApplication.processEvents()
                time.sleep(0.01)
            configure("plain", widget.segmenter.encoder.runner)
            timed_encode(widget)  # warm-up (allocations, first-call costs)
            rows = {v: [] for v in VARIANTS}
            for _ in range(repeats):
                for variant in VARIANTS:
                    configure(variant, widget.segmenter.encoder.runner)
                    rows[variant].append(timed_encode(widget))
                    print(model_type, variant, rows[variant][-1], flush=True)
            results[model_type] = {
                v: {k: statistics.median(r[k] for r in runs) for k in ("max", "p99", "encode_s")}
                for v, runs in rows.items()
            }
            widget.set_image_layer(None)
    finally:
        viewer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_t"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    results = run(args.models, args.size, args.repeats)
    rows = ""
    for model_type, variants in results.items():
        plain = variants["plain"]["encode_s"]
        for variant, r in variants.items():
            rows += (f"| {model_type} | {variant} | {r['max']:.0f} | {r['p99']:.0f} | {r['encode_s']:.2f} | "
                     f"{r['encode_s'] / plain:.2f} |\n")
    table = (
        f"`xvfb-run -a .venv/bin/python benchmarks/bench_gui_stall.py --models {' '.join(args.models)} "
        f"--size {args.size} --repeats {args.repeats}`: the Segment Anything widget docked in a shown viewer "
        f"(Xvfb), one background encode of a {args.size}x{args.size} image (random weights) while a 10 ms "
        f"QTimer runs on the GUI thread; median of {args.repeats} alternating rounds. {cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average before the run {load_before}. "
        "`plain` is the default. The largest gap is where the status line changes "
        "(one window repaint: Mesa llvmpipe composes the whole window in software).\n\n"
        "| model | worker | largest gap (ms) | p99 gap (ms) | encode (s) | encode / plain |\n"
        "|---|---|---|---|---|---|\n" + rows
    )
    print(table)
    if args.write:
        write_section("gui-stall", "## GUI-thread stalls while encoding\n\n" + table)


if __name__ == "__main__":
    main()
