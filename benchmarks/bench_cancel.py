"""Cancel latency where users feel it: from a click on Cancel to the job having ended.

    xvfb-run -a .venv/bin/python benchmarks/bench_cancel.py [--cases amg ais encode propagate]
        [--repeats 5] [--write]

The widgets are docked as users get them (``add_plugin_dock_widget``) in a shown viewer
(Xvfb), with random-weight models (the cost of a step does not depend on the weights):

* ``amg``: Segment Everything, AMG at its default settings (32 x 32 points), vit_b, on a
  1024 x 1024 image whose embedding is cached (the long part is decoding the point grid);
* ``ais``: Segment Everything, AIS: vit_b with micro-sam's instance decoder architecture
  (transposed-conv variant, random weights), embedding cached (the long part is the
  decoder at full resolution, seconds per stage on a CPU);
* ``encode``: Segment Everything, AIS, with no cached embedding (the long part is the
  vit_b image encoder);
* ``propagate``: the Segment Anything widget's volume panel propagating one previewed
  object through a (24, 512, 512) stack with vit_t (each step encodes a new slice).

Each repeat clicks the real Run (Propagate) button, waits a random delay inside the long
part, clicks the real Cancel button, and times until the widget's job runner reports the
job ended (``busy_changed(False)``: the worker thread has returned and the widget shows
"cancelled"); the labels must be unchanged: no new layer, and the data of every Labels
layer that existed before equal (Segment Everything targets an existing Labels layer with
an object in it). There is no reference figure: Meta's and micro-sam's code has no cancel. Reports p50 and max per case; the target is <= 1 s.
``--write`` updates BENCHMARKS.md (section cancel-latency).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import numpy as np
import torch
from bench_widget_latency import build_model, make_image
from common import cpu_name, write_section

CASES = ("amg", "ais", "encode", "propagate")
# random delay (s) between Run and Cancel, inside the long part of each job on this CPU
DELAYS = {"amg": (1.0, 8.0), "ais": (0.5, 10.0), "encode": (0.3, 4.0), "propagate": (0.5, 4.0)}
BOUND = {
    "amg": "one decoder call of a few prompts, or one upsampling chunk",
    "ais": "one band of ~17 GFLOP of the AIS decoder's convolutions",
    "encode": "one vit_b block's MLP (windowed blocks), or one global-attention sequence",
    "propagate": "one vit_t encoder block (TinyViT), or one slice's decode",
}


def pump(seconds: float) -> None:
    """Run the Qt event loop for ``seconds`` (the GUI stays live, as for a user)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    (loop.exec if hasattr(loop, "exec") else loop.exec_)()


def click(button) -> None:
    """A real left click on a Qt button (press + release through Qt's event system)."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    if not button.isEnabled():
        raise RuntimeError(f"the {button.text()!r} button is disabled")
    QTest.mouseClick(button, Qt.MouseButton.LeftButton)


def labels_data(viewer) -> dict:
    """A copy of the data of each Labels layer by name but the prompt preview: a write into
    an existing layer shows as a difference, not only a new layer."""
    from napari.layers import Labels

    from napari_sam._napari.prompt_layers import PREVIEW_ROLE, ROLE_KEY

    return {layer.name: np.array(layer.data) for layer in viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get(ROLE_KEY) != PREVIEW_ROLE}


def labels_unchanged(viewer, before: dict) -> bool:
    """The Labels layers of ``before`` (:func:`labels_data`) are all still there, with the
    same data (new layers are checked apart)."""
    now = labels_data(viewer)
    return all(name in now and np.array_equal(now[name], data) for name, data in before.items())


def cancel_after(run_button, cancel_button, runner, delay: float, long_part, status) -> dict | None:
    """Click ``run_button``, wait ``delay`` s, click ``cancel_button``; the time until
    ``runner`` is idle again. None when the job was not inside its long part by then
    (``long_part()`` False) or had already ended. ``status()``: the widget's status line,
    recorded at the cancel (where the job was)."""
    from qtpy.QtCore import QEventLoop, QTimer

    click(run_button)
    if runner.job is None:
        raise RuntimeError("the job did not start")
    job = runner.job
    pump(delay)
    if runner.job is not job or not long_part():
        runner.cancel()  # not a sample; nothing may be written either
        runner.wait(600)
        return None
    loop = QEventLoop()
    ended = {}

    def on_busy(busy: bool) -> None:
        if not busy:
            ended["t"] = time.perf_counter()
            loop.quit()

    runner.busy_changed.connect(on_busy)
    QTimer.singleShot(60_000, loop.quit)  # a safety net, never reached when cancel works
    at = status()
    t0 = time.perf_counter()
    click(cancel_button)
    if runner.job is job:
        (loop.exec if hasattr(loop, "exec") else loop.exec_)()
    runner.busy_changed.disconnect(on_busy)
    if "t" not in ended:
        raise RuntimeError("the job did not end within 60 s of Cancel")
    if not job.ended.is_set():
        raise RuntimeError("the runner went idle before the worker thread returned")
    return {"latency": ended["t"] - t0, "delay": delay, "at": at}


def everything_case(viewer, case: str, repeats: int, rng: random.Random, shots: str | None) -> list[dict]:
    from sam_factory import perturb_

    from napari_sam.model.instance_decoder import InstanceDecoder

    layer = viewer.layers["image"]
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Everything")
    model = build_model("vit_b", "auto")
    if case != "amg":
        model.instance_decoder = perturb_(InstanceDecoder(256, 1024, transposed=True), seed=1).eval()
    widget.session.set_model(model)
    widget.set_image_layer(layer)
    widget.set_mode("amg" if case == "amg" else "ais")
    # the objects would go into an existing Labels layer with an object: a cancelled job
    # must write nothing into it
    def fresh_target():
        if "existing labels" in viewer.layers:
            viewer.layers.remove("existing labels")
        existing = np.zeros(layer.data.shape[:2], np.int32)
        existing[:64, :64] = 1
        target = viewer.add_labels(existing, name="existing labels")
        pump(0.2)
        widget.set_labels_layer(target)
        return labels_data(viewer)

    fresh_target()
    if case != "encode":  # the embedding is cached, as after the interactive widget encoded
        from napari_sam._napari.geometry import current_plane

        widget.session.embedding(layer, current_plane(viewer.dims, layer))
    # amg: the whole job (the cached lookup is instant; its first progress comes after a batch)
    long_part = {"amg": lambda: True,
                 "ais": lambda: widget.status == "AIS decoder",
                 "encode": lambda: widget.status == "encoding"}[case]
    before = len(viewer.layers)
    labels_before = labels_data(viewer)
    results = []
    while len(results) < repeats:
        if case == "encode":
            widget.session.cache.invalidate()
        r = cancel_after(widget._run_button, widget._cancel_button, widget.runner,
                         rng.uniform(*DELAYS[case]), long_part, lambda: widget.status)
        if r is None:  # it may have run to its end and written its objects: start afresh
            print(case, "job was past its long part at the cancel: sample dropped", flush=True)
            labels_before = fresh_target()
            continue
        if ("cancelled" not in widget.status or len(viewer.layers) != before
                or not labels_unchanged(viewer, labels_before)):
            now = labels_data(viewer)
            changed = [n for n, d in labels_before.items() if n not in now or not np.array_equal(now[n], d)]
            raise RuntimeError(f"cancel did not leave the labels alone: {widget.status!r}, changed: {changed}, "
                               f"layers {[x.name for x in viewer.layers]}")
        results.append(r)
        print(case, f"cancel after {r['delay']:.2f} s ({r['at']!r}) -> ended {r['latency'] * 1000:.0f} ms later",
              flush=True)
    if shots:
        pump(0.3)
        widget.grab().save(os.path.join(shots, f"everything_cancelled_{case}.png"))
    viewer.window.remove_dock_widget(widget)
    viewer.layers.remove("existing labels")
    return results


def propagate_case(viewer, repeats: int, rng: random.Random, shots: str | None) -> list[dict]:
    stack = np.stack([make_image(512)] * 24)
    yy, xx = np.mgrid[:512, :512]
    for z in range(len(stack)):  # a bright disc shrinking away from the middle slice
        stack[z][(yy - 256) ** 2 + (xx - 256) ** 2 < (120 - 3 * abs(z - 12)) ** 2] = 240
    layer = viewer.add_image(stack, name="stack")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(build_model("vit_t", "auto"))
    widget.set_image_layer(layer)
    viewer.dims.set_current_step(0, 12)
    results = []
    while len(results) < repeats:
        widget.session.cache.invalidate()
        if not widget.encode_current_slice(wait=True) or not widget.add_point((256.0, 256.0)):
            raise RuntimeError(f"no preview to propagate: {widget.status}")
        volume = widget.volume
        labels_before = labels_data(viewer)
        r = cancel_after(volume._propagate, volume._cancel_button, volume.runner,
                         rng.uniform(*DELAYS["propagate"]), lambda: True, lambda: widget.status)
        if r is None:
            print("propagate: the propagation ended before the cancel: sample dropped", flush=True)
            if "SAM labels" in viewer.layers:  # it wrote its labels: start afresh
                viewer.layers.remove("SAM labels")
            continue
        if ("cancelled" not in widget.status or not labels_unchanged(viewer, labels_before)
                or "SAM labels" in viewer.layers and viewer.layers["SAM labels"].data.any()):
            raise RuntimeError(f"cancel did not leave the labels alone: {widget.status!r}")
        results.append(r)
        print("propagate", f"cancel after {r['delay']:.2f} s ({r['at']!r}) -> ended {r['latency'] * 1000:.0f} ms "
              "later", flush=True)
    if shots:
        widget.grab().save(os.path.join(shots, "segment_anything_propagation_cancelled.png"))
    viewer.window.remove_dock_widget(widget)
    viewer.layers.remove(layer)
    return results


def run(cases, repeats: int, seed: int, shots: str | None) -> dict:
    import napari

    rng = random.Random(seed)
    viewer = napari.Viewer(show=True)
    results = {}
    try:
        viewer.add_image(make_image(1024), name="image")
        for case in cases:
            if case == "propagate":
                results[case] = propagate_case(viewer, repeats, rng, shots)
            else:
                results[case] = everything_case(viewer, case, repeats, rng, shots)
    finally:
        viewer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="of the random delays")
    parser.add_argument("--screenshots", default=None, help="folder for a grab of each widget after its last cancel")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    results = run(args.cases, args.repeats, args.seed, args.screenshots)
    rows = ""
    for case, runs in results.items():
        ms = [r["latency"] * 1000 for r in runs]
        delays = [r["delay"] for r in runs]
        verdict = "✔" if max(ms) <= 1000 else "✘"
        rows += (f"| {case} | {len(ms)} | {min(delays):.1f}–{max(delays):.1f} | {statistics.median(ms):.0f} | "
                 f"{max(ms):.0f} | {verdict} | {BOUND[case]} |\n")
    table = (
        f"`xvfb-run -a .venv/bin/python benchmarks/bench_cancel.py --cases {' '.join(args.cases)} "
        f"--repeats {args.repeats}`: widgets docked in a shown viewer (Xvfb), real clicks (QTest) on "
        "Run / Propagate, then on Cancel after a random delay inside the job's long part; time from the "
        "Cancel click to the job runner idle again (worker thread returned, status \"cancelled\", labels "
        f"unchanged). Random weights, precision auto. {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, load average before the run {load_before}. No reference: Meta's and "
        "micro-sam's code cannot be cancelled. Target: <= 1 s.\n\n"
        "| case | cancels | delay (s) | p50 (ms) | max (ms) | <= 1 s | bounded by |\n"
        "|---|---|---|---|---|---|---|\n" + rows
    )
    print(table)
    if args.write:
        write_section("cancel-latency", "## Cancel latency\n\n" + table)


if __name__ == "__main__":
    main()
