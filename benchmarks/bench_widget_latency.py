"""Click -> preview latency in the real Segment Anything widget (napari, Qt).

    xvfb-run -a .venv/bin/python benchmarks/bench_widget_latency.py [--write]
        [--model vit_b] [--size 1024] [--clicks 40]

A vit_b-sized model (random weights: decode cost does not depend on their values) on a
1024 x 1024 image in a shown napari viewer. After one encoding, each "click" adds a
point through the Points layer (as a mouse click does), which runs the widget's whole
path synchronously: read prompts (world -> data), decode, upsample the shown candidate,
write and refresh the preview layer. We time that, plus the Qt event processing that
draws it. Clicks come in groups of three (1, 2, 3 points), then the prompts are cleared
(untimed). Prints p50 / p95; ``--write`` updates BENCHMARKS.md (section widget-latency).
About 30 s with vit_b on a 2-core CPU (most of it the one encoding).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from common import percentile, write_section


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


def run(model_type: str, size: int, clicks: int, precision: str) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    try:
        layer = viewer.add_image(make_image(size), name="image")
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
        widget.set_model(build_model(model_type, precision))
        widget.set_image_layer(layer)
        t0 = time.perf_counter()
        widget.encode_current_slice(wait=True)
        encode_s = time.perf_counter() - t0
        points = viewer.layers["SAM points"]
        rng = np.random.default_rng(1)
        sync_ms, drawn_ms = [], []
        for i in range(clicks + 3):  # 3 warm-up clicks
            if i % 3 == 0:
                widget.clear()
                QApplication.processEvents()
            rc = rng.uniform(0.1 * size, 0.9 * size, 2)
            t0 = time.perf_counter()
            points.add(rc[None])  # what a mouse click in "add" mode does
            t1 = time.perf_counter()
            QApplication.processEvents()  # draw the refreshed preview
            t2 = time.perf_counter()
            assert widget.current_masks is not None
            if i >= 3:
                sync_ms.append(1000 * (t1 - t0))
                drawn_ms.append(1000 * (t2 - t0))
        return {
            "model": model_type, "size": size, "clicks": clicks, "encode_s": encode_s,
            "encoder_dtype": str(widget.session.model.encoder_dtype),
            "sync_p50": percentile(sync_ms, 50), "sync_p95": percentile(sync_ms, 95),
            "drawn_p50": percentile(drawn_ms, 50), "drawn_p95": percentile(drawn_ms, 95),
        }
    finally:
        viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.model, args.size, args.clicks, args.precision)
    table = (
        f"Click -> preview in the Segment Anything widget, {r['model']} (random weights), "
        f"{r['size']}x{r['size']} image, {r['clicks']} clicks of 1-3 points, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; encoder {r['encoder_dtype']} took {r['encode_s']:.1f} s.\n\n"
        "| path | p50 (ms) | p95 (ms) |\n|---|---|---|\n"
        f"| prompt -> decode -> upsample -> preview refresh | {r['sync_p50']:.1f} | {r['sync_p95']:.1f} |\n"
        f"| same + Qt event processing (draw) | {r['drawn_p50']:.1f} | {r['drawn_p95']:.1f} |\n"
    )
    print(table)
    if args.write:
        write_section("widget-latency", "## Widget click -> preview latency\n\n" + table)


if __name__ == "__main__":
    main()
