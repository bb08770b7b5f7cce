"""Click -> preview latency in the Segment Anything widget, driven by real mouse events.

    xvfb-run -a .venv/bin/python benchmarks/bench_widget_latency.py [--write]
        [--model vit_b] [--size 1024] [--clicks 40] [--hold-ms 100] [--note "machine state"]

The widget is docked as users get it (``add_plugin_dock_widget``) in a shown viewer; a
vit_b-sized model with random weights (decode cost does not depend on their values) on a
1024 x 1024 image. After one encoding, each click is a mouse press + release sent by
``QTest`` to the canvas' native widget at the screen point of a random pixel (the Points
layer in "add" mode, as the widget leaves it). A click is timed from the press to the end
of the first canvas draw after the preview was updated (vispy's draw event, after Qt
processed the paint). Clicks come in groups of three (1, 2, 3 points), then the prompts
are cleared (untimed). The release is sent right after the press (no event processed in
between); the widget decodes on the press and has the preview drawn before returning, so
napari's handling of the release (the Points layer adds the point then) comes after the
preview's first draw, which is where a click is timed to.

Breakdown (each click's time split at instrumented calls, p50 over the clicks):
napari's mouse handling before our prediction (``_predict``: prompts -> masks -> preview),
our decode (``decode_objects``), upsampling of the shown candidate (``Prediction.crops``),
the preview layer's update and refresh (``show_preview``), the rest of our prediction
(prompt reading, status, UI), the time from there until the preview is drawn, thumbnails
(inside the above), and, outside the total, napari's release handling (Points add,
highlight, thumbnail) when it came after the preview's draw.
Groups of clicks of several kinds take turns in one run: the clicks above; clicks that redraw
the preview as before (the whole plane re-sliced and uploaded) instead of in place (the
changed box only), the "whole" row; held clicks, as a person clicks: the button held
``--hold-ms`` with events processed meanwhile, timed from the press to the first draw of
the preview (before the release when the widget is done by then); and rested clicks, as a
person aims: the cursor moved to the spot and left there ``--rest-ms`` (each value its own
group) before a held click, so the widget's decode-ahead may have the masks ready; the
same clicks' press -> preview with decode-ahead off (the "rested, decode-ahead off" row)
shows what it saves, and "missed" clicks (the cursor rested 40 px from where the click then
comes, with no move in between: the background decode is for the wrong spot and must be
stopped) what a wrong guess costs. Only GUI-thread work enters the breakdown.
In the same run, the engine's own ``predict`` (one point, multimask, full-res masks) and
its low-res decode alone give the floor the widget adds to.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch

from common import cpu_name, percentile, write_section

PARTS = [
    ("before", "napari mouse handling before our prediction (press: vispy picking)"),
    ("decode", "our prompt -> decode (`decode_objects`)"),
    ("upsample", "upsample the shown candidate (`Prediction.crops`)"),
    ("preview", "preview layer update + refresh (`show_preview`)"),
    ("handler_rest", "rest of our prediction (prompt reading, status, UI)"),
    ("draw", "after our prediction until the preview is drawn (Qt paint + vispy draw)"),
    ("release", "(napari's release handling: Points add, highlight; after the preview's draw when that came first)"),
]


def build_model(model_type: str, precision: str):
    from napari_sam.engine import choose_precision
    from napari_sam.model import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config(model_type)).eval()
    model.encoder_dtype = choose_precision(precision, torch.device("cpu"))
    model.checkpoint_sha256 = "random-weights"
    return model


def make_image(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    img = ((np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 60 + 128).astype(np.float32)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


class Probes:
    """Wall time spent inside instrumented calls during one click (the GUI thread)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}
        self._undo = []

    def wrap(self, owner, name: str, part: str, mark: str | None = None) -> None:
        original = getattr(owner, name)
        probes = self

        def timed(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return original(*args, **kwargs)  # a decode ahead: not the click's own work
            t0 = time.perf_counter()
            if mark and mark + "_in" not in probes.marks:
                probes.marks[mark + "_in"] = t0
            try:
                return original(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                probes.spent[part] += t1 - t0
                if mark and mark + "_out" not in probes.marks:  # the first call's end
                    probes.marks[mark + "_out"] = t1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def reset(self) -> None:
        self.spent.clear()
        self.marks.clear()

    def remove(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


@contextmanager
def shown_viewer():
    import napari

    viewer = napari.Viewer(show=True)
    try:
        yield viewer
    finally:
        viewer.close()


def engine_floor(predictor, size: int, repeats: int) -> dict:
    """p50 of the engine's one-point ``predict`` (3 full-res masks) and low-res decode."""
    rng = np.random.default_rng(2)
    full, low = [], []
    for _ in range(repeats):
        xy = rng.uniform(0.1 * size, 0.9 * size, (1, 2))
        t0 = time.perf_counter()
        predictor.predict(point_coords=xy, point_labels=np.ones(1, int), multimask_output=True)
        full.append(1000 * (time.perf_counter() - t0))
        coords = torch.as_tensor(predictor.transform.apply_coords(xy[None], predictor.original_size), dtype=torch.float)
        t0 = time.perf_counter()
        predictor.decode_low_res(coords, torch.ones(1, 1, dtype=torch.int), None, None, True)
        low.append(1000 * (time.perf_counter() - t0))
    return {"predict_p50": percentile(full, 50), "decode_low_res_p50": percentile(low, 50)}


def run(model_type: str, size: int, clicks: int, precision: str, hold_ms: float, rest_ms: list[float]) -> dict:
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication
    from test_napari_first_hour import canvas_point  # the tests' world -> canvas pixel

    import napari_sam._napari.decode as decode_mod
    import napari_sam._napari.prompt_layers as prompt_layers_mod
    import napari_sam._napari.segmenter as segmenter_mod
    from napari.layers import Labels, Points

    with shown_viewer() as viewer:
        layer = viewer.add_image(make_image(size), name="image")
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
        widget.set_model(build_model(model_type, precision))
        widget.set_image_layer(layer)
        t0 = time.perf_counter()
        widget.encode_current_slice(wait=True)
        encode_s = time.perf_counter() - t0
        viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.01)

        canvas = viewer.window._qt_viewer.canvas
        native = canvas.native
        drawn = {"t": 0.0, "ends": []}

        def on_draw(_event=None):
            drawn["t"] = time.perf_counter()
            drawn["ends"].append(drawn["t"])

        canvas._scene_canvas.events.draw.connect(on_draw, position="last")
        probes = Probes()
        seg = widget.segmenter
        probes.wrap(seg, "_predict", "handler", mark="handler")
        probes.wrap(segmenter_mod, "decode_objects", "decode")
        probes.wrap(decode_mod.Prediction, "crops", "upsample")
        probes.wrap(segmenter_mod, "show_preview", "preview")
        probes.wrap(Points, "_update_thumbnail", "thumbnail")
        probes.wrap(Labels, "_update_thumbnail", "thumbnail")

        rng = np.random.default_rng(1)
        totals, parts, whole_plane = [], defaultdict(list), []
        in_place = prompt_layers_mod._refresh_region
        kinds = ["in place", "whole", "held", *(("rested", r, on) for r in rest_ms for on in (True, False)),
                 *(("missed", r, True) for r in rest_ms)]
        try:
            held, rested = [], defaultdict(list)
            for i in range(len(kinds) * clicks + 3):  # 3 warm-up clicks, then groups of each kind in turn
                kind = "in place" if i < 3 else kinds[((i - 3) // 3) % len(kinds)]
                whole = kind == "whole"
                prompt_layers_mod._refresh_region = (lambda *_a: False) if whole else in_place
                if i % 3 == 0:
                    widget.clear()
                    for _ in range(3):
                        QApplication.processEvents()
                rc = rng.uniform(0.1 * size, 0.9 * size, 2)
                pos = canvas_point(viewer, layer.data_to_world(rc))
                probes.reset()
                if kind == "held":
                    held.append(held_click(native, pos, drawn, probes, hold_ms))
                    continue
                if kind[0] in ("rested", "missed"):
                    _, rest, ahead = kind
                    seg.decode_ahead = ahead
                    # missed: the cursor rested 40 image px away, then the click came without a move
                    rest_at = pos if kind[0] == "rested" else pos + QPoint(40, 0)
                    QTest.mouseMove(native, rest_at)
                    t_rest = time.perf_counter()
                    while time.perf_counter() - t_rest < rest / 1000:
                        QApplication.processEvents()
                        time.sleep(0.001)
                    probes.reset()
                    rested[(kind[0], rest, ahead)].append(held_click(native, pos, drawn, probes, hold_ms))
                    seg.decode_ahead = True
                    continue
                drawn["t"], drawn["ends"] = 0.0, []
                t0 = time.perf_counter()
                QTest.mousePress(native, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pos)
                t_press = time.perf_counter()
                QTest.mouseRelease(native, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pos)
                t_sync = time.perf_counter()
                deadline = t_sync + 2.0
                while drawn["t"] < t_sync and time.perf_counter() < deadline:  # the release's draw too
                    QApplication.processEvents()
                shown = probes.marks.get("handler_out", float("inf"))
                t_drawn = min((t for t in drawn["ends"] if t > shown), default=0.0)  # the preview's first draw
                if "handler_in" not in probes.marks or widget.current_masks is None or not t_drawn:
                    raise RuntimeError(f"click {i} at {pos} did not produce a drawn preview")
                if i < 3:
                    continue
                if whole:
                    whole_plane.append(1000 * (t_drawn - t0))
                    continue
                s = probes.spent
                totals.append(1000 * (t_drawn - t0))
                parts["before"].append(1000 * (probes.marks["handler_in"] - t0))
                for name in ("decode", "upsample", "preview", "thumbnail"):
                    parts[name].append(1000 * s.get(name, 0.0))
                parts["handler_rest"].append(
                    1000 * (s["handler"] - s.get("decode", 0) - s.get("upsample", 0) - s.get("preview", 0)))
                parts["draw"].append(1000 * (t_drawn - probes.marks["handler_out"]))
                parts["release"].append(1000 * (t_sync - max(t_press, min(t_drawn, t_sync))))
        finally:
            probes.remove()
            prompt_layers_mod._refresh_region = in_place
        floor = engine_floor(widget.session.predictor, size, 20)
        return {
            "model": model_type, "size": size, "clicks": clicks, "encode_s": encode_s,
            "encoder_dtype": str(getattr(widget.session.model, "encoder_dtype", None) or "float32"),
            "p50": percentile(totals, 50), "p95": percentile(totals, 95),
            "whole_p50": percentile(whole_plane, 50), "whole_p95": percentile(whole_plane, 95),
            "parts": {k: (percentile(v, 50), percentile(v, 95)) for k, v in parts.items()},
            "hold_ms": hold_ms, "held_p50": percentile(held, 50), "held_p95": percentile(held, 95),
            "rested": {key: (percentile(v, 50), percentile(v, 95)) for key, v in rested.items()},
            **floor,
        }


def held_click(native, pos, drawn, probes, hold_ms: float) -> float:
    """Press -> first draw of the preview (ms) of a click whose button is held ``hold_ms``
    with events processed, as a person's click."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    left, none = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    drawn["t"] = 0.0
    t0 = time.perf_counter()
    QTest.mousePress(native, left, none, pos)
    released = False
    while True:
        shown = probes.marks.get("handler_out")
        if shown is not None and drawn["t"] > shown:
            break
        if not released and time.perf_counter() - t0 >= hold_ms / 1000:
            QTest.mouseRelease(native, left, none, pos)
            released = True
        QApplication.processEvents()
        if time.perf_counter() - t0 > 5:
            raise RuntimeError(f"held click at {pos} did not produce a drawn preview")
    t_drawn = drawn["t"]
    while not released and time.perf_counter() - t0 < hold_ms / 1000:
        QApplication.processEvents()
    if not released:
        QTest.mouseRelease(native, left, none, pos)
    t_release = time.perf_counter()
    while drawn["t"] < t_release and time.perf_counter() - t_release < 2:  # the point's draw
        QApplication.processEvents()
    return 1000 * (t_drawn - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hold-ms", type=float, default=100.0,
                        help="how long the held clicks keep the button down")
    parser.add_argument("--rest-ms", type=float, nargs="*", default=[100.0, 250.0],
                        help="how long the cursor rests on the spot before a rested click (one group each)")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, written after the table")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    r = run(args.model, args.size, args.clicks, args.precision, args.hold_ms, args.rest_ms)
    rows = "".join(
        f"| {label} | {r['parts'][key][0]:.1f} | {r['parts'][key][1]:.1f} |\n" for key, label in PARTS)
    table = (
        f"`xvfb-run -a .venv/bin/python benchmarks/bench_widget_latency.py --model {r['model']} "
        f"--size {r['size']} --clicks {r['clicks']} --hold-ms {r['hold_ms']:.0f} --rest-ms "
        f"{' '.join(f'{v:.0f}' for v in args.rest_ms)}`: the widget docked with `add_plugin_dock_widget` in a "
        f"shown viewer (Xvfb, Mesa llvmpipe), {r['model']} with random weights, {r['size']}x{r['size']} image, "
        f"{r['clicks']} real mouse clicks (QTest press + release on the canvas; groups of 1-3 points), timed "
        f"from the press to the end of the canvas draw showing the preview. {cpu_name()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load average before the run {load_before} "
        f"(shared machine); encoder {r['encoder_dtype']} took "
        f"{r['encode_s']:.1f} s.\n\n"
        "| click -> drawn preview | p50 (ms) | p95 (ms) |\n|---|---|---|\n"
        f"| **total** | **{r['p50']:.1f}** | **{r['p95']:.1f}** |\n{rows}"
        f"| total, button held {r['hold_ms']:.0f} ms as a person's click (press -> preview drawn; "
        f"{r['clicks']} more clicks, groups alternating with the others) | {r['held_p50']:.1f} | "
        f"{r['held_p95']:.1f} |\n"
        + "".join(
            f"| total, cursor rested {rest:.0f} ms {'on the spot' if kind == 'rested' else 'elsewhere (40 px away)'}, "
            f"then a held click (press -> preview drawn), decode-ahead {'on (default)' if on else 'off'} "
            f"| {p50:.1f} | {p95:.1f} |\n"
            for (kind, rest, on), (p50, p95) in sorted(r["rested"].items(), key=lambda kv: (kv[0][1], kv[0][0] == "missed", not kv[0][2])))
        + f"| total, preview redrawn whole (re-slice + whole-plane upload, as before; {r['clicks']} more clicks) | "
        f"{r['whole_p50']:.1f} | {r['whole_p95']:.1f} |\n"
        f"| (thumbnails, inside the rows above) | {r['parts']['thumbnail'][0]:.1f} | "
        f"{r['parts']['thumbnail'][1]:.1f} |\n\n"
        f"Same run, the engine alone (one point): `predict` with 3 full-res masks p50 "
        f"{r['predict_p50']:.1f} ms, low-res decode p50 {r['decode_low_res_p50']:.1f} ms.\n"
        + (f"\n{args.note}\n" if args.note else "")
    )
    print(table)
    if args.write:
        write_section("widget-latency", "## Widget click -> preview latency\n\n" + table)


if __name__ == "__main__":
    main()
