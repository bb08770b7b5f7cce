"""Core engine benchmark: reference segment-anything vs napari-sam, same random weights.

    .venv/bin/python benchmarks/bench_core.py [--write] [--repeats 3]

Each implementation runs in its own process so peak RSS is its own. Prints times and
ratios (ours / reference) and, with --write, updates BENCHMARKS.md. Measures:
vit_b encoder per precision (median of --repeats runs), one-point predict p50/p95 over
30 calls at 1024x1024, bf16-vs-fp32 mask IoU, vit_t encoder, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import median, peak_rss_mb, percentile, run_worker, timed, write_section

HERE = Path(__file__).resolve()
IMAGE_SIZE = (1024, 1024)
POINT = np.array([[400.0, 600.0]])


def make_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : IMAGE_SIZE[0], 0 : IMAGE_SIZE[1]]
    img = np.stack([(xx * 0.3) % 255, (yy * 0.7) % 255, ((xx + yy) * 0.2) % 255], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def make_checkpoints(folder: Path) -> dict[str, str]:
    from reference_shim import import_mobile_sam, import_segment_anything
    from sam_factory import perturb_

    sa = import_segment_anything()
    torch.manual_seed(0)
    paths = {"vit_b": str(folder / "vit_b.pth"), "vit_t": str(folder / "vit_t.pth")}
    torch.save(perturb_(sa.sam_model_registry["vit_b"]()).state_dict(), paths["vit_b"])
    ms = import_mobile_sam()
    torch.save(perturb_(ms.sam_model_registry["vit_t"]()).state_dict(), paths["vit_t"])
    return paths


def worker(impl: str, model_type: str, precision: str, checkpoint: str, repeats: int) -> dict:
    image = make_image()
    if impl == "ref":
        from reference_shim import import_mobile_sam, import_segment_anything

        mod = import_mobile_sam() if model_type == "vit_t" else import_segment_anything()
        model = mod.sam_model_registry[model_type]()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        predictor = mod.SamPredictor(model.eval())
    else:
        from napari_sam import SamPredictor, build_sam

        predictor = SamPredictor(build_sam(model_type, checkpoint, "cpu", precision))
    with torch.inference_mode():
        predictor.set_image(image)  # warm-up (allocator, kernels)
        enc = timed(lambda: predictor.set_image(image), repeats)
        labels = np.array([1])
        for _ in range(3):
            predictor.predict(POINT, labels)
        dec = timed(lambda: predictor.predict(POINT, labels), 30)
        masks, scores, _ = predictor.predict(POINT, labels)
    out = {
        "encoder_s": median(enc),
        "predict_p50_ms": 1000 * median(dec),
        "predict_p95_ms": 1000 * percentile(dec, 95),
        "peak_rss_mb": peak_rss_mb(),
    }
    np.save(Path(checkpoint).with_suffix(f".{impl}.{precision}.masks.npy"), masks)
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    ious = [np.logical_and(x, y).sum() / max(np.logical_or(x, y).sum(), 1) for x, y in zip(a, b)]
    return float(min(ious))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        impl, model_type, precision, ckpt, repeats = args.worker
        print(json.dumps(worker(impl, model_type, precision, ckpt, int(repeats))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        ckpts = make_checkpoints(Path(tmp))
        r = str(args.repeats)
        runs = {
            ("vit_b", "ref", "fp32"): run_worker(HERE, "ref", "vit_b", "fp32", ckpts["vit_b"], r),
            ("vit_b", "ours", "fp32"): run_worker(HERE, "ours", "vit_b", "fp32", ckpts["vit_b"], r),
            ("vit_b", "ours", "bf16"): run_worker(HERE, "ours", "vit_b", "bf16", ckpts["vit_b"], r),
            ("vit_t", "ref", "fp32"): run_worker(HERE, "ref", "vit_t", "fp32", ckpts["vit_t"], r),
            ("vit_t", "ours", "fp32"): run_worker(HERE, "ours", "vit_t", "fp32", ckpts["vit_t"], r),
            ("vit_t", "ours", "bf16"): run_worker(HERE, "ours", "vit_t", "bf16", ckpts["vit_t"], r),
        }
        base = Path(ckpts["vit_b"])
        load = lambda impl, prec: np.load(base.with_suffix(f".{impl}.{prec}.masks.npy"))  # noqa: E731
        iou_fp32 = mask_iou(load("ours", "fp32"), load("ref", "fp32"))
        iou_bf16 = mask_iou(load("ours", "bf16"), load("ref", "fp32"))

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}. Random weights (same file for both), image {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} RGB, "
        f"encoder = median of {args.repeats} runs after a warm-up, predict = 30 one-point calls "
        "(multimask, masks at full resolution). Ratio = ours / reference, same run.",
        "",
        "| model | impl | precision | encoder s | ratio | predict p50 ms | p95 ms | ratio p50 | peak RSS MiB | mask IoU vs ref fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, impl, prec), res in runs.items():
        ref = runs[(model, "ref", "fp32")]
        iou = {"ref": "1", "fp32": f"{iou_fp32:.4f}", "bf16": f"{iou_bf16:.4f}"}
        iou_txt = (iou["ref"] if impl == "ref" else iou[prec]) if model == "vit_b" else "-"
        lines.append(
            f"| {model} | {impl} | {prec} | {res['encoder_s']:.2f} | {res['encoder_s'] / ref['encoder_s']:.2f} "
            f"| {res['predict_p50_ms']:.1f} | {res['predict_p95_ms']:.1f} "
            f"| {res['predict_p50_ms'] / ref['predict_p50_ms']:.2f} | {res['peak_rss_mb']:.0f} | {iou_txt} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("core", "## Core engine (`benchmarks/bench_core.py`)\n\n" + table)


if __name__ == "__main__":
    sys.exit(main())
