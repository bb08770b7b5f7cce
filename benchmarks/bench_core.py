"""Core engine benchmark: reference segment-anything vs napari-sam, same random weights.

    .venv/bin/python benchmarks/bench_core.py [--write] [--repeats 3] [--bf16 auto|yes|no]
        [--fidelity]

Times: the reference and ours are loaded in ONE process and run ALTERNATELY (reference
encode, ours per precision, again …), so a busy machine slows both alike; the table gives
the minimum (and median) of --repeats encodes after a warm-up, and one-point ``predict``
p50/p95 over 30 calls (in 3 alternating rounds of 10) at 1024x1024. Mask IoU: ours against
the reference fp32, same prompt, same process. Peak RSS: each implementation alone in a
fresh process (encode + predict), so one's memory never counts for the other.
bf16 rows: by default only where the CPU has native bf16 (emulated bf16 is slower than
fp32, and ``precision="auto"`` never picks it there). --fidelity adds the bf16 encoder's
smallest mask IoU against fp32 on the prompts of Meta's predictor notebook (the bound
behind ``precision="auto"``; bf16 is emulated where the CPU lacks it, so it is slow there
but rounds the same). With --write, updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import (
    cpu_name,
    median,
    peak_rss_mb,
    percentile,
    run_worker,
    timed,
    write_section,
)

HERE = Path(__file__).resolve()
IMAGE_SIZE = (1024, 1024)
POINT = np.array([[400.0, 600.0]])
LABELS = np.array([1])


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


def load_predictor(impl: str, model_type: str, precision: str, checkpoint: str):
    """The reference's SamPredictor (impl "ref", fp32) or ours at ``precision``."""
    if impl == "ref":
        from reference_shim import import_mobile_sam, import_segment_anything

        mod = import_mobile_sam() if model_type == "vit_t" else import_segment_anything()
        model = mod.sam_model_registry[model_type]()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return mod.SamPredictor(model.eval())
    from napari_sam import SamPredictor, build_sam

    return SamPredictor(build_sam(model_type, checkpoint, "cpu", precision))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest IoU over the (K, H, W) bool masks paired up."""
    ious = [np.logical_and(x, y).sum() / max(np.logical_or(x, y).sum(), 1) for x, y in zip(a, b)]
    return float(min(ious))


def time_worker(model_type: str, checkpoint: str, precisions: list[str], repeats: int) -> dict:
    """Reference fp32 and ours at each precision in this one process, alternating."""
    image = make_image()
    runs = {"ref fp32": load_predictor("ref", model_type, "fp32", checkpoint)}
    runs.update({f"ours {p}": load_predictor("ours", model_type, p, checkpoint) for p in precisions})
    enc = {name: [] for name in runs}
    dec = {name: [] for name in runs}
    masks = {}
    with torch.inference_mode():
        for predictor in runs.values():
            predictor.set_image(image)  # warm-up (allocator, kernels)
        for _ in range(repeats):
            for name, predictor in runs.items():
                enc[name] += timed(partial(predictor.set_image, image), 1)
        for name, predictor in runs.items():  # every predictor keeps its last embedding
            for _ in range(3):
                predictor.predict(POINT, LABELS)
            masks[name] = predictor.predict(POINT, LABELS)[0]
        for _ in range(3):
            for name, predictor in runs.items():
                dec[name] += timed(partial(predictor.predict, POINT, LABELS), 10)
    return {
        name: {
            "encoder_min_s": min(enc[name]),
            "encoder_median_s": median(enc[name]),
            "predict_p50_ms": 1000 * median(dec[name]),
            "predict_p95_ms": 1000 * percentile(dec[name], 95),
            "mask_iou_vs_ref": mask_iou(masks[name], masks["ref fp32"]),
        }
        for name in runs
    }


def rss_worker(impl: str, model_type: str, precision: str, checkpoint: str) -> dict:
    """Peak RSS of one implementation alone: load, encode, predict."""
    predictor = load_predictor(impl, model_type, precision, checkpoint)
    with torch.inference_mode():
        predictor.set_image(make_image())
        predictor.predict(POINT, LABELS)
    return {"peak_rss_mb": peak_rss_mb()}


# Meta's predictor notebook: its prompts on an image of the notebook's size (1800 x 1200)
NOTEBOOK_PROMPTS = [
    {"point_coords": [[500, 375]], "point_labels": [1]},
    {"point_coords": [[500, 375], [1125, 625]], "point_labels": [1, 1]},
    {"point_coords": [[500, 375], [1125, 625]], "point_labels": [1, 0]},
    {"box": [425, 600, 700, 875]},
    {"box": [425, 600, 700, 875], "point_coords": [[575, 750]], "point_labels": [0]},
]


def fidelity_worker(checkpoint: str) -> dict:
    """Ours vit_b bf16 vs fp32: smallest mask IoU over the notebook prompts (3 masks each)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1200, 0:1800]
    image = np.stack([(xx * 0.3) % 255, (yy * 0.7) % 255, ((xx + yy) * 0.2) % 255], -1)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    masks, embeddings = {}, {}
    for precision in ("fp32", "bf16"):
        predictor = load_predictor("ours", "vit_b", precision, checkpoint)
        with torch.inference_mode():
            predictor.set_image(image)
            embeddings[precision] = predictor.get_image_embedding()
            masks[precision] = np.concatenate([
                predictor.predict(**{k: np.asarray(v, int if k == "point_labels" else float)
                                     for k, v in p.items()})[0]
                for p in NOTEBOOK_PROMPTS
            ])
    a, b = embeddings["bf16"], embeddings["fp32"]
    return {"min_iou": mask_iou(masks["bf16"], masks["fp32"]),
            "embedding_rel_err": float((a - b).norm() / b.norm())}


def bf16_rows(choice: str) -> bool:
    if choice == "auto":
        from napari_sam.engine.device import cpu_has_native_bf16

        return cpu_has_native_bf16()
    return choice == "yes"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="bf16 rows: auto = only on a CPU with native bf16")
    parser.add_argument("--fidelity", action="store_true",
                        help="bf16 vs fp32 masks on the predictor notebook's prompts (vit_b)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "time":
            model_type, ckpt, precisions, repeats = rest
            result = time_worker(model_type, ckpt, precisions.split(","), int(repeats))
        elif kind == "fidelity":
            result = fidelity_worker(*rest)
        else:
            result = rss_worker(*rest)
        print(json.dumps(result))
        return

    from napari_sam.engine.device import choose_precision

    precisions = ["fp32", "bf16"] if bf16_rows(args.bf16) else ["fp32"]
    auto = choose_precision("auto", torch.device("cpu"))
    auto_name = "fp32" if auto is None else str(auto).removeprefix("torch.").replace("bfloat16", "bf16")
    rows, fidelity = [], None
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = make_checkpoints(Path(tmp))
        if args.fidelity:
            fidelity = run_worker(HERE, "fidelity", ckpts["vit_b"])
        for model_type in ("vit_b", "vit_t"):
            times = run_worker(HERE, "time", model_type, ckpts[model_type], ",".join(precisions),
                               str(args.repeats))
            ref = times["ref fp32"]
            for name, res in times.items():
                impl, prec = name.split()
                rss = run_worker(HERE, "rss", impl, model_type, prec, ckpts[model_type])
                rows.append(
                    f"| {model_type} | {impl} | {prec}{' (auto)' if impl == 'ours' and prec == auto_name else ''} "
                    f"| {res['encoder_min_s']:.2f} | {res['encoder_median_s']:.2f} "
                    f"| {res['encoder_min_s'] / ref['encoder_min_s']:.2f} "
                    f"| {res['predict_p50_ms']:.1f} | {res['predict_p95_ms']:.1f} "
                    f"| {res['predict_p50_ms'] / ref['predict_p50_ms']:.2f} | {rss['peak_rss_mb']:.0f} "
                    f"| {res['mask_iou_vs_ref']:.4f} |"
                )
    lines = [
        (f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Random weights (same file for both), image {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} RGB. "
        f"Reference and ours alternate in one process: encoder = min and median of "
        f"{args.repeats} runs after a warm-up, predict = 3 rounds of 10 one-point calls (multimask, "
        "masks at full resolution). Ratio = ours / reference (encoder: minimum; predict: p50). "
        "Peak RSS = each implementation alone in a fresh process (load, encode, predict). "
        "Mask IoU = smallest over the 3 masks, against the reference fp32. "
        f"`precision=\"auto\"` picks {auto_name} on this CPU."),
        "",
        ("| model | impl | precision | encoder min s | median s | ratio | predict p50 ms | p95 ms "
         "| ratio p50 | peak RSS MiB | mask IoU vs ref fp32 |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if fidelity is not None:
        lines += ["", (f"bf16 fidelity (ours vit_b, bf16 vs fp32, prompts of Meta's predictor notebook "
                      f"on a 1800x1200 image, 15 masks): smallest mask IoU {fidelity['min_iou']:.4f} "
                      f"(bound 0.99), embedding relative error {fidelity['embedding_rel_err']:.4f}.")]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("core", "## Core engine (`benchmarks/bench_core.py`)\n\n" + table)


if __name__ == "__main__":
    sys.exit(main())
