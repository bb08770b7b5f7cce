"""GUI-thread stalls while the Segment Anything widget encodes in the background.

    xvfb-run -a .venv/bin/python benchmarks/bench_gui_stall.py [--write]
        [--models vit_b vit_t] [--size 1024] [--repeats 3] [--variants ...]

The widget is docked as users get it (``add_plugin_dock_widget``) in a shown viewer with a
1024 x 1024 image; a model with random weights (an encode's cost does not depend on them).
A 10 ms ``QTimer`` on the GUI thread records when it fires while the widget's background
encode runs (the real Qt event loop, not a polling loop); the gaps between firings beyond
its 10 ms period are what a user feels as a frozen viewer (measured from the request to
300 ms after the job ended: the result is applied then). Reports the largest gap, the
99th percentile gap and the encode's wall time, for each way of running the worker:

* ``activity dock (before)``: the job also in napari's activity dock, as every job was
  before: its animated "in progress" indicator repaints the window ~25 times a second;
* ``decoder work on the GUI thread (before)``: the end of the encode as it was before the
  worker prepared the decoder: the GUI thread copies the features (``set_embedding``) and
  computes the decoder's image-side projections (``prepare_decoder``) when it applies the
  result;
* ``plain``: the job runner's default: the worker at the GUI's priority, all torch threads;
  the decoder's per-image work done in the worker (``SamPredictor.prepare_embedding``).

``end gap`` is the largest gap from the job's end on (the result applied, the window
repainted).

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

VARIANTS = ("activity dock (before)", "decoder work on the GUI thread (before)", "plain")


def configure(variant: str, encoder) -> None:
    """Set up the slice ``encoder`` (a ``SliceEncoder``) for ``variant``: its jobs in
    napari's activity dock, or the decoder's per-image work left to the GUI thread, for
    the "before" rows only."""
    import functools

    from napari_sam._napari import encoding, jobs

    state = encoder.__dict__
    state.setdefault("_bench_on_ready", encoder._on_ready)  # the segmenter's callback
    encoder._on_ready = state["_bench_on_ready"]
    encoding.__dict__.setdefault("_bench_encode_then_prepare", encoding._encode_then_prepare)
    encoding._encode_then_prepare = encoding._bench_encode_then_prepare
    encoder.runner.__dict__.pop("start", None)
    if variant == "activity dock (before)":
        encoder.runner.start = functools.partial(jobs.JobRunner.start, encoder.runner, activity=True)
    elif variant == "decoder work on the GUI thread (before)":
        def encode_only(job, predictor):
            key, embedding = yield from job
            return key, embedding, None  # set_embedding copies the features on the GUI thread

        def prepare_then_ready():
            encoder.session.predictor.prepare_decoder()
            state["_bench_on_ready"]()

        encoding._encode_then_prepare = encode_only
        encoder._on_ready = prepare_then_ready


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
    after_end = times[1:] > done["t"]  # gaps ending after the job's end (it started before)
    return {"max": float(gaps.max()), "p99": float(np.percentile(gaps, 99)), "encode_s": done["t"] - t0,
            "end": float(gaps[after_end].max()), "max_at_s": float(times[worst] - t0)}


def run(models: list[str], size: int, repeats: int, variants=VARIANTS) -> dict:
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
            configure("plain", widget.segmenter.encoder)
            timed_encode(widget)  # warm-up (allocations, first-call costs)
            rows = {v: [] for v in variants}
            for _ in range(repeats):
                for variant in variants:
                    configure(variant, widget.segmenter.encoder)
                    rows[variant].append(timed_encode(widget))
                    print(model_type, variant, rows[variant][-1], flush=True)
            results[model_type] = {
                v: {k: statistics.median(r[k] for r in runs) for k in ("max", "end", "p99", "encode_s")}
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
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    if "plain" not in args.variants:
        parser.error("--variants must include plain (the other rows are compared with it)")
    results = run(args.models, args.size, args.repeats, args.variants)
    rows = ""
    for model_type, variants in results.items():
        plain = variants["plain"]["encode_s"]
        for variant, r in variants.items():
            rows += (f"| {model_type} | {variant} | {r['max']:.0f} | {r['end']:.0f} | {r['p99']:.0f} | "
                     f"{r['encode_s']:.2f} | "
                     f"{r['encode_s'] / plain:.2f} |\n")
    table = (
        f"`xvfb-run -a .venv/bin/python benchmarks/bench_gui_stall.py --models {' '.join(args.models)} "
        f"--size {args.size} --repeats {args.repeats}`: the Segment Anything widget docked in a shown viewer "
        f"(Xvfb), one background encode of a {args.size}x{args.size} image (random weights) while a 10 ms "
        f"QTimer runs on the GUI thread; median of {args.repeats} alternating rounds. {cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average before the run {load_before}. "
        "`plain` is the default. The end gap: the largest from the job's end on (the result "
        "applied, the status line and buttons repainted: one window repaint, which Mesa llvmpipe "
        "composes in software).\n\n"
        "| model | worker | largest gap (ms) | end gap (ms) | p99 gap (ms) | encode (s) | encode / plain |\n"
        "|---|---|---|---|---|---|---|\n" + rows
    )
    print(table)
    if args.write:
        write_section("gui-stall", "## GUI-thread stalls while encoding\n\n" + table)


if __name__ == "__main__":
    main()
