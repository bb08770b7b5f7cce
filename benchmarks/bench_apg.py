"""Automatic prompt generation (APG): micro-sam's ``AutomaticPromptGenerator`` vs ours.

    .venv/bin/python benchmarks/bench_apg.py [--size 512] [--cells 80] [--repeats 3]
        [--cases default multimasking refine iomin]

Same random weights for both (SAM's full mask decoder, 256 channels, the decoder of every
SAM size; a reduced image encoder, since the embedding is computed first and not timed),
same image, same decoder outputs (the perfect ones of a synthetic cell label image). We
time what comes after the embedding: prompts, decoding, NMS, label image. Reference and
ours run in this process after one untimed warm-up each, alternating, ``--repeats`` times
each; the minimum of each is reported with the ratio ours / reference, and how the label
images compare (identical, or object counts and the worst matched IoU: float differences in
the SAM logits flip a few pixels). Random weights give large textured masks rather than
cells: the mask post-processing (NMS, merging) is heavier than with a trained model, for
both, and the painted textures fall apart into many small objects.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, cpu_name  # noqa: F401  (ROOT: puts tests/ on sys.path)

CASES = {
    "default": {},
    "multimasking": {"multimasking": True},
    "refine": {"refine_with_box_prompts": True},
    "iomin": {"intersection_over_min": True},
}


def build(size: int, cells: int):
    """(reference predictor, ours, decoder outputs, number of prompts), image already set."""
    from instance_targets import decoder_targets_from_labels, synthetic_cells
    from reference_shim import import_segment_anything
    from sam_factory import TINY_VIT_B_1024, reference_sam, save_checkpoint

    from napari_sam import SamPredictor, build_sam
    from napari_sam.engine.prompt_generation import point_prompts_from_decoder_outputs

    sa = import_segment_anything()  # also makes micro-sam importable (torchvision shim)
    torch.manual_seed(0)
    ref_model = reference_sam(TINY_VIT_B_1024, seed=3)
    path = save_checkpoint(ref_model, Path(tempfile.mkdtemp()) / "random_vit_b_1024.pth")
    ours = SamPredictor(build_sam(TINY_VIT_B_1024, checkpoint=path, device="cpu", precision="fp32"))
    ref = sa.SamPredictor(ref_model)
    labels = synthetic_cells((size, size), cells, 0)
    rng = np.random.default_rng(0)
    image = np.where(labels[..., None] > 0, 200, 40).astype(np.uint8).repeat(3, axis=-1)
    image = (image + rng.normal(0, 10, image.shape)).clip(0, 255).astype(np.uint8)
    ref.set_image(image)
    ours.set_image(image)
    maps = decoder_targets_from_labels(labels)
    return ref, ours, maps, len(point_prompts_from_decoder_outputs(*maps))


def compare(ours: np.ndarray, ref: np.ndarray) -> str:
    """"identical", or the object counts and the worst IoU of each reference object with
    the object of ours it overlaps most (float differences in SAM logits flip a few pixels)."""
    if np.array_equal(ours, ref):
        return "identical"
    n_ours, n_ref = len(np.unique(ours[ours > 0])), len(np.unique(ref[ref > 0]))
    if n_ours != n_ref:
        return f"{n_ours} vs {n_ref} objects"
    area = np.bincount(ours.ravel())
    worst = 1.0
    for i in np.unique(ref[ref > 0]):
        mask = ref == i
        j = int(np.bincount(ours[mask]).argmax())
        inter = int(np.count_nonzero(ours[mask] == j))
        worst = min(worst, 0.0 if j == 0 else inter / (mask.sum() + area[j] - inter))
    return f"same count, min IoU {worst:.4f} ({int((ours != ref).sum())} pixels differ)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--cells", type=int, default=80, help="cells in the synthetic label image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["default", "refine"], choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref, ours, maps, n_prompts = build(args.size, args.cells)

    from micro_sam.instance_segmentation import AutomaticPromptGenerator

    from napari_sam.engine.prompt_generation import (
        ApgParameters,
        instances_from_prompts,
    )

    apg = AutomaticPromptGenerator(ref, None)
    apg.set_state(dict(zip(("foreground", "center_distances", "boundary_distances"), maps)))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"image {args.size}x{args.size}, {n_prompts} prompts; SAM decoder 256 channels (random weights)")
    apg.generate()  # warm-up (first calls allocate, build per-image caches), not timed
    instances_from_prompts(ours, *maps)
    print(f"{'case':<14}{'micro-sam s':>12}{'ours s':>10}{'ours/ref':>10}{'objects':>9}  labels")
    for case in args.cases:
        kwargs = CASES[case]
        times = {"ref": [], "ours": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref_labels = apg.generate(**kwargs)
            times["ref"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            our_labels = instances_from_prompts(ours, *maps, ApgParameters(**kwargs))
            times["ours"].append(time.perf_counter() - t0)
        t_ref, t_ours = min(times["ref"]), min(times["ours"])
        equal = compare(our_labels, ref_labels)
        print(f"{case:<14}{t_ref:>12.2f}{t_ours:>10.2f}{t_ours / t_ref:>10.3f}{int(our_labels.max()):>9}  {equal}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
