"""Segment everything: reference ``SamAutomaticMaskGenerator`` vs ours, same random vit_b.

    .venv/bin/python benchmarks/bench_automatic.py [--points 16 32] [--repeats 2] [--bf16] [--write]

Same weights (random vit_b, saved once as a checkpoint), same 1024x1024 image. The default
thresholds keep no mask of a random-weight model (its predicted IoUs lie in about
[-0.3, 0.25], its stability scores below 0.02), which leaves upsampling, NMS and record
building unmeasured; so the thresholds are taken inside that distribution
(:data:`THRESHOLDS`: dozens of masks survive). Random-weight masks are speckle whose box is
the whole image, so any box NMS below 1 would keep one of them: ``box_nms_thresh=1.0``
(NMS still runs, and drops nothing). The embedding is computed first and not timed: we time
what comes after it (grid decoding, filters, NMS, mask records). Each run is a fresh
process, so memory figures are its own: peak RSS of the whole process, and of the
generation alone (the kernel's peak counter is reset after the embedding). Prints times,
ratios (ours / reference) and whether the masks are the same (count, every reference mask
matched with IoU >= 0.99); ``--write`` updates BENCHMARKS.md. ``--bf16`` adds a run of ours
with the mask decoder in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import cpu_name, peak_rss_mb, run_worker, write_section

HERE = Path(__file__).resolve()
IMAGE_SIZE = 1024
#: inside the random model's score distribution: ~13% of predicted IoUs are above 0.2 and
#: about half of those masks reach a stability of 0.005
THRESHOLDS = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.005, "box_nms_thresh": 1.0}


def make_image() -> np.ndarray:
    """(1024, 1024, 3) uint8: scikit-image's astronaut photograph, upscaled."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def make_checkpoint(folder: Path) -> str:
    from reference_shim import import_segment_anything
    from sam_factory import perturb_

    sa = import_segment_anything()
    torch.manual_seed(0)
    path = str(folder / "vit_b.pth")
    torch.save(perturb_(sa.sam_model_registry["vit_b"]()).state_dict(), path)
    return path


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM), where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(impl: str, points: int, checkpoint: str, out: str) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    image = make_image()
    if impl == "ref":
        from reference_shim import import_segment_anything

        sa = import_segment_anything()
        model = sa.sam_model_registry["vit_b"]()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        gen = sa.SamAutomaticMaskGenerator(model.eval(), points_per_side=points, **THRESHOLDS)
        gen.predictor.set_image(image)
        gen.predictor.set_image = lambda *a, **k: None  # keep the embedding computed above
        gen.predictor.reset_image = lambda: None
        generate = lambda: gen.generate(image)  # noqa: E731
    else:
        from napari_sam import SamPredictor, build_sam
        from napari_sam.engine.automatic import SamAutomaticMaskGenerator, run_to_end

        model = build_sam("vit_b", checkpoint=checkpoint, device="cpu", precision="fp32")
        model.decoder_dtype = torch.bfloat16 if impl == "ours-bf16" else None
        embedding = SamPredictor(model).encode_image(image)
        gen = SamAutomaticMaskGenerator(model, points_per_side=points, **THRESHOLDS)
        generate = lambda: run_to_end(gen.run(image, embedding=embedding)).to_records()  # noqa: E731
    rss_before, peak_before = _rss_mb("VmRSS"), peak_rss_mb()
    reset = _reset_peak()  # (this also resets getrusage's maxrss on Linux)
    t0 = time.perf_counter()
    records = generate()
    seconds = time.perf_counter() - t0
    masks = np.zeros((len(records), IMAGE_SIZE * IMAGE_SIZE), dtype=bool)
    for i, r in enumerate(records):
        masks[i] = r["segmentation"].ravel()
    np.savez_compressed(out, masks=np.packbits(masks, axis=1), iou=np.array([r["predicted_iou"] for r in records]))
    return {
        "seconds": seconds,
        "masks": len(records),
        "rss_before_mb": rss_before,
        "generation_peak_mb": _rss_mb("VmHWM") if reset else float("nan"),
        "process_peak_mb": max(peak_before, peak_rss_mb()),
    }


def same_masks(ref_file: str, ours_file: str) -> str:
    """'yes' when counts match and every reference mask has a match with IoU >= 0.99."""
    ref, ours = np.load(ref_file)["masks"], np.load(ours_file)["masks"]
    if len(ref) != len(ours):
        return f"no ({len(ours)} vs {len(ref)} masks)"
    if len(ref) == 0:
        return "yes (0 masks)"
    a = np.unpackbits(ref, axis=1).astype(np.float32)
    b = np.unpackbits(ours, axis=1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    best = (inter / np.maximum(union, 1)).max(1)
    return "yes" if best.min() >= 0.99 else f"no (worst IoU {best.min():.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[16, 32], help="points per side")
    parser.add_argument("--bf16", action="store_true", help="also ours with a bfloat16 mask decoder")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the fastest is kept")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "POINTS", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, points, checkpoint, out = args.worker
        print(json.dumps(worker(impl, int(points), checkpoint, out)))
        return

    impls = ["ref", "ours"] + (["ours-bf16"] if args.bf16 else [])
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        for points in args.points:
            results = {}
            for _ in range(args.repeats):  # alternating; the fastest run of each is kept
                for impl in impls:
                    out = str(Path(tmp) / f"{impl}-{points}.npz")
                    r = run_worker(HERE, impl, str(points), checkpoint, out)
                    r["file"] = out
                    print(f"{points}x{points} {impl:9s} {r['seconds']:7.2f} s  {r['masks']:4d} masks  "
                          f"generation peak {r['generation_peak_mb']:.0f} MiB  process peak {r['process_peak_mb']:.0f} MiB",
                          flush=True)
                    if impl not in results or r["seconds"] < results[impl]["seconds"]:
                        results[impl] = r
            ref = results["ref"]
            rows.append(f"| {points}x{points} | reference | {ref['seconds']:.2f} | 1 | {ref['masks']} | | "
                        f"{ref['generation_peak_mb']:.0f} | {ref['process_peak_mb']:.0f} |")
            for impl in impls[1:]:
                r = results[impl]
                ratio = r["seconds"] / ref["seconds"]
                same = same_masks(ref["file"], r["file"])
                print(f"{points}x{points} {impl}: {ratio:.3f}x the reference's time; same masks: {same}")
                rows.append(f"| {points}x{points} | {impl} | {r['seconds']:.2f} | **{ratio:.3f}** | {r['masks']} | "
                            f"{same} | {r['generation_peak_mb']:.0f} | {r['process_peak_mb']:.0f} |")

    lines = [
        "## Segment everything (vit_b, random weights, 1024x1024, thresholds inside the random model's scores)",
        "",
        (
            f"`benchmarks/bench_automatic.py`; {cpu_name()}, "
            f"{os.cpu_count()} threads, torch {torch.__version__}. "
            f"Thresholds {', '.join(f'{k}={v}' for k, v in THRESHOLDS.items())} (the defaults keep no "
            "mask of random weights; their masks are speckle over the whole image, so box NMS below 1 "
            "would keep one). Time after the embedding "
            "(grid decoding, filters, NMS, binary-mask records); peak RSS of the generation alone "
            "(peak counter reset after the embedding) and of the whole process; fastest of "
            f"{args.repeats} alternating run(s) of each. "
            "Same masks: same count and every reference mask matched with IoU >= 0.99. "
            f"Load average (1 min) at the start / end of the run: {load_start:.1f} / {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} CPUs (above ~{os.cpu_count()}, other jobs shared the cores: times inflated)."
        ),
        "",
        "| grid | implementation | time (s) | ours / reference | masks | same masks | generation peak RSS (MiB) | process peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(lines + rows)
    print()
    print(table)
    if args.write:
        write_section("bench_automatic", table)
        print("BENCHMARKS.md updated", file=sys.stderr)


if __name__ == "__main__":
    main()
