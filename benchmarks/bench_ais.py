"""Automatic instance segmentation after the embedding: micro-sam's pipeline vs ours, and AMG.

    .venv/bin/python benchmarks/bench_ais.py [--repeats 3] [--write]
    python3 benchmarks/bench_ais.py --device cuda --no-reference   # a GPU machine, ours only

On one 1024x1024 image's vit_b embedding (random weights: timing does not depend on them):

* decoder: micro-sam's ``DecoderAdapter`` (torch_em UNETR, ``get_unetr``) vs our
  ``InstanceDecoder`` holding the same ``decoder_state`` (transposed-conv variant, as
  micro-sam's published decoders), fp32;
* post-processing: micro-sam's ``InstanceSegmentationWithDecoder.generate`` vs
  ``instances_from_decoder_outputs`` on the maps a perfect decoder outputs for ~700 dense
  cells (tests/instance_targets.py; random-weight maps are mush with no cells in them);
* AIS = decoder + post-processing;
* AMG 32x32 (ours, default thresholds) on the same embedding, for the "AIS vs AMG" ratio.

Reference and ours alternate in one process; each figure is the minimum of --repeats runs
after a warm-up. micro-sam is test-only (scripts/setup_env.sh --testing).
"""

from __future__ import annotations

import argparse
import time

import common
import numpy as np
import torch

SECTION = "bench_ais_latest"  # the raw table of the last --write run


def best_of(fn, repeats: int) -> tuple[float, object]:
    result, times = fn(), []  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="ours only (no micro-sam)")
    parser.add_argument("--amg", action="store_true", help="also time AMG 32x32 (slow on a CPU)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    from instance_targets import decoder_targets_from_labels, synthetic_cells
    from sam_factory import perturb_

    from napari_sam.engine.instance_segmentation import instances_from_decoder_outputs
    from napari_sam.model import build_model, get_config
    from napari_sam.model.instance_decoder import InstanceDecoder, decoder_from_state

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = get_config("vit_b")
    decoder_state = perturb_(InstanceDecoder(256, 1024, transposed=True), seed=1).state_dict()
    ours_decoder = decoder_from_state(decoder_state, config).to(device)
    embedding = torch.randn(1, 256, 64, 64, device=device)
    size = (1024, 1024)
    maps = decoder_targets_from_labels(synthetic_cells(size, 700, 3, radius=(10, 30)))

    rows = []
    ours_dec, _ = best_of(lambda: ours_decoder(embedding, size, size), args.repeats)
    ours_post, labels = best_of(lambda: instances_from_decoder_outputs(*maps), args.repeats)
    ref_dec = ref_post = None
    if not args.no_reference:
        from reference_shim import import_segment_anything

        import_segment_anything()
        from micro_sam.instance_segmentation import (
            DecoderAdapter,
            InstanceSegmentationWithDecoder,
            get_unetr,
        )

        encoder = build_model(config).image_encoder  # get_unetr needs one; it is not run
        ref_decoder = DecoderAdapter(get_unetr(encoder, decoder_state, device="cpu")).eval()
        segmenter = InstanceSegmentationWithDecoder(None, None)
        segmenter.set_state(dict(zip(("foreground", "center_distances", "boundary_distances"), maps)))
        with torch.no_grad():
            ref_dec, _ = best_of(lambda: ref_decoder(embedding, size, size), args.repeats)
        ref_post, _ = best_of(segmenter.generate, args.repeats)
        # alternate: ours again after the reference, keep the best of both rounds
        ours_dec = min(ours_dec, best_of(lambda: ours_decoder(embedding, size, size), args.repeats)[0])
        ours_post = min(ours_post, best_of(lambda: instances_from_decoder_outputs(*maps), args.repeats)[0])

    def row(what, ref, ours):
        ratio = f"**{ours / ref:.2f}**" if ref else ""
        rows.append(f"| {what} | {'' if ref is None else f'{ref:.2f}'} | {ours:.2f} | {ratio} |")

    row("AIS decoder (1024², fp32)", ref_dec, ours_dec)
    row(f"AIS post-processing ({int(labels.max())} cells)", ref_post, ours_post)
    row("AIS after the embedding", None if ref_dec is None else ref_dec + ref_post, ours_dec + ours_post)
    amg_line = ""
    if args.amg:
        from napari_sam.engine.automatic import SamAutomaticMaskGenerator
        from napari_sam.engine.predictor import SamPredictor

        model = build_model(config).to(device)
        model.checkpoint_sha256 = "random"
        image = (np.random.default_rng(0).random((1024, 1024, 3)) * 255).astype(np.uint8)
        emb = SamPredictor(model).encode_image(image)
        generator = SamAutomaticMaskGenerator(model)
        t0 = time.perf_counter()
        for _ in generator.run(image, embedding=emb):
            pass
        amg = time.perf_counter() - t0
        rows.append(f"| AMG 32x32 (ours, vit_b) | | {amg:.2f} | AIS is {amg / (ours_dec + ours_post):.1f}x faster |")
        amg_line = " AMG: one run."
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{common.cpu_name()}, {torch.get_num_threads()} threads"
    body = "\n".join([
        "## Automatic instance segmentation (`benchmarks/bench_ais.py`)",
        "",
        (f"{where}, torch {torch.__version__}. Seconds, minimum of {args.repeats} runs after a "
         f"warm-up, micro-sam and ours alternating in one process; ratio = ours / micro-sam.{amg_line}"),
        "",
        "| step | micro-sam s | ours s | ratio |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    if args.write:
        common.write_section(SECTION, body)


if __name__ == "__main__":
    main()
