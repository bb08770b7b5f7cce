"""AIS post-processing: micro-sam's ``InstanceSegmentationWithDecoder.generate`` vs ours.

    .venv/bin/python benchmarks/bench_ais_postprocess.py [--repeats 7] [--size 1024]

Both get the same decoder outputs (foreground, centre and boundary distances, float32 in
[0, 1]) and micro-sam's default parameters; we time only the post-processing (smoothing,
seeds, watershed), not a decoder. Three kinds of outputs at --size x --size:

* ``sparse cells``: what a perfect decoder outputs for ~400 separate and touching cells
  (14% foreground), tests/instance_targets.py;
* ``dense cells``: the same for ~700 larger cells covering ~60% of the image, most in
  touching clusters;
* ``random fields``: smoothed Gaussian noise (~850 instances, many pits without a seed,
  the hardest case for us).

Reference and ours run in one process, alternating, after one warm-up each; we print the
minimum of --repeats runs of wall time and of process CPU time (both run on one thread; on
a shared machine the CPU time is the steadier of the two), the ratios (ours / reference),
and how equal the results are (instance counts, pixels that agree, worst IoU of the
instances matched one-to-one).
micro-sam is test-only: scripts/setup_env.sh --testing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import cpu_name  # also puts tests/ on sys.path
from scipy import ndimage


def random_fields(size: int, seed: int = 0, sigma: float = 6.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
        maps.append(((field - field.min()) / (field.max() - field.min())).astype(np.float32))
    return tuple(maps)


def cases(size: int) -> dict[str, tuple[np.ndarray, ...]]:
    from instance_targets import decoder_targets_from_labels, synthetic_cells

    scale = size / 1024
    return {
        "sparse cells": decoder_targets_from_labels(synthetic_cells((size, size), int(400 * scale**2), 2)),
        "dense cells": decoder_targets_from_labels(
            synthetic_cells((size, size), int(700 * scale**2), 3, radius=(10, 30))
        ),
        "random fields": random_fields(size),
    }


def agreement(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(fraction of equal pixels, worst IoU of an instance with its best partner)."""
    a, b = ours.astype(np.int64).ravel(), ref.astype(np.int64).ravel()
    na, nb = int(a.max()), int(b.max())
    inter = np.bincount(a * (nb + 1) + b, minlength=(na + 1) * (nb + 1)).reshape(na + 1, nb + 1)
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    iou = (inter / np.maximum(union, 1))[1:, 1:]
    worst = min(iou.max(1).min(initial=1), iou.max(0).min(initial=1))
    return float(np.mean(a == b)), float(worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    from reference_shim import import_segment_anything

    import_segment_anything()  # the torchvision shim, before micro-sam
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder

    from napari_sam.engine.instance_segmentation import instances_from_decoder_outputs

    print(f"CPU: {cpu_name()}, {args.size} x {args.size}, min of {args.repeats} runs, alternating")
    print(
        f"{'case':<14} {'micro-sam':>10} {'ours':>8} {'ratio':>6} {'(CPU time)':>22} "
        f"{'instances':>10} {'equal px':>9} {'worst IoU':>9}"
    )
    for name, maps in cases(args.size).items():
        segmenter = InstanceSegmentationWithDecoder(None, None)
        foreground, center, boundary = maps
        segmenter.set_state({"foreground": foreground, "center_distances": center, "boundary_distances": boundary})
        runs = {
            "ref": segmenter.generate,
            "ours": lambda maps=maps: instances_from_decoder_outputs(*maps),
        }
        wall = {key: [] for key in runs}
        cpu = {key: [] for key in runs}
        results = {key: run() for key, run in runs.items()}  # warm-up
        for _ in range(args.repeats):
            for key, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
        ref_ms, ours_ms = 1000 * min(wall["ref"]), 1000 * min(wall["ours"])
        ref_cpu, ours_cpu = 1000 * min(cpu["ref"]), 1000 * min(cpu["ours"])
        equal, worst = agreement(results["ours"], results["ref"])
        counts = f"{int(results['ref'].max())}/{int(results['ours'].max())}"
        cpu_text = f"{ref_cpu:.0f}/{ours_cpu:.0f}ms {ours_cpu / ref_cpu:.2f}"
        print(
            f"{name:<14} {ref_ms:>8.1f}ms {ours_ms:>6.1f}ms {ours_ms / ref_ms:>6.2f} {cpu_text:>22} "
            f"{counts:>10} {100 * equal:>8.3f}% {worst:>9.3f}"
        )


if __name__ == "__main__":
    main()
