"""napari-sam everything INPUT -o LABELS.tif: segment everything, without a viewer.

--mode ais (the default for models with an instance decoder, e.g. --model vit_b_lm):
micro-sam's automatic instance segmentation, seconds per slice on a CPU; apg: prompts from
that decoder, decoded by SAM; amg (the default otherwise): SAM's point grid, slow on a CPU.

INPUT is a 2D image ((H, W) grayscale or (H, W, 3|4) colour) or a stack ((N, H, W) or
(N, H, W, 3|4)) in .tif/.tiff, .png/.jpg, .npy or .zarr. A stack is segmented slice by
slice and objects overlapping in consecutive slices share one id (--link-iou). The output
is a label image of the same spatial shape (uint16, or uint32 above 65535 objects), as
.tif/.tiff or .npy; it is written whole or not at all (a temporary file in the same folder,
then renamed), and never over the input. Images must be at least 8 x 8 pixels.

Exit codes: 0 done, 1 failed while computing or writing (e.g. weights download), 2 bad
input or arguments (checked before any model is loaded, the output folder included),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import add_model_arguments, cli_wording
from .files import (
    check_image_size,
    check_writable_folder,
    read_stack,
    refuse_overlap,
    write_atomic,
)

OUTPUT_SUFFIXES = (".tif", ".tiff", ".npy")

# flag: (type, default, help) — the generator's own parameters and defaults (--mode amg)
GENERATOR_FLAGS = {
    "points_per_side": (int, 32, "grid points per image side"),
    "points_per_batch": (int, 64, "prompts decoded together"),
    "pred_iou_thresh": (float, 0.88, "minimum predicted mask quality"),
    "stability_score_thresh": (float, 0.95, "minimum stability score"),
    "stability_score_offset": (float, 1.0, "logit shift used by the stability score"),
    "box_nms_thresh": (float, 0.7, "box IoU above which the worse of two masks is dropped"),
    "crop_n_layers": (int, 0, "also run on 2^n x 2^n crops (small objects; slower)"),
    "crop_nms_thresh": (float, 0.7, "box IoU for duplicates between crops"),
    "crop_overlap_ratio": (float, 512 / 1500, "overlap of neighbouring crops"),
    "crop_n_points_downscale_factor": (int, 1, "fewer points per side in crop layers"),
    "min_mask_region_area": (int, 0, "fill holes / drop islands smaller than this (pixels)"),
}


# --mode ais / apg: (type, default, help). The defaults are AisParameters' / ApgParameters'
# (micro-sam's), written here only for --help: the parser must not import the engine (torch)
# before main runs (Ctrl-C, start-up time); tests/test_instances_e2e.py checks they agree.
# An option left out keeps the engine's default.
AIS_FLAGS = {
    "center_distance_threshold": (float, 0.5, "seeds: predicted centre distance below this"),
    "boundary_distance_threshold": (float, 0.5, "seeds: predicted boundary distance below this"),
    "foreground_threshold": (float, 0.5, "foreground: predicted probability above this"),
    "foreground_smoothing": (float, 1.0, "ais: Gaussian sigma for the foreground map"),
    "distance_smoothing": (float, 1.6, "ais: Gaussian sigma for the distance maps"),
}
APG_FLAGS = {
    "nms_threshold": (float, 0.9, "apg: mask overlap above which the worse mask is dropped"),
    "batch_size": (int, 32, "apg: prompts decoded together"),
}
MIN_SIZE_DEFAULTS = {"ais": 0, "apg": 25, "amg": 0}
APG_SWITCHES = {
    "multimasking": "apg: SAM picks the best of three masks per prompt",
    "intersection_over_min": "apg: overlap over the smaller mask instead of the union",
    "refine_with_box_prompts": "apg: decode again with boxes around the first masks",
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "everything",
        help="segment everything in a 2D image or a stack into a label image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="image or stack: .tif/.tiff, .png/.jpg, .npy or .zarr")
    p.add_argument("-o", "--output", required=True, help="output label image (.tif/.tiff or .npy)")
    add_model_arguments(p)
    p.add_argument("--mode", default="auto", choices=("auto", "ais", "apg", "amg"),
                   help="ais: instance decoder + watershed; apg: decoder prompts + SAM; amg: SAM "
                        "point grid; auto (default): ais if the model has a decoder, else amg")
    for name, (kind, default, help_text) in {**AIS_FLAGS, **APG_FLAGS}.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       metavar="N" if kind is int else "X", help=f"{help_text} (default {default:.4g})")
    for name, help_text in APG_SWITCHES.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)
    for name, (kind, default, help_text) in GENERATOR_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                       help=f"{help_text} (default {default:.4g})")
    p.add_argument("--min-size", type=int, default=None,
                   help="drop smaller objects (pixels; default: {ais} for ais and amg, {apg} for "
                        "apg, as micro-sam)".format(**MIN_SIZE_DEFAULTS))
    p.add_argument("--link-iou", type=float, default=0.25,
                   help="stack: IoU for objects of consecutive slices to share an id")
    p.add_argument("--rgb", default="auto", choices=("auto", "yes", "no"),
                   help="is a last axis of size 3 or 4 colour? (auto: yes)")
    p.add_argument("--contrast-limits", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="map LOW..HIGH to 0..255 (default: robust percentiles, one pair for a whole stack)")
    p.add_argument("--store", metavar="PATH",
                   help="embedding store of INPUT made by `napari-sam embed` (same model): "
                        "slices stored there are not encoded again (ais/apg then need no "
                        "encoder at all); missing slices are encoded and added")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_input(path: Path):
    """The input as an array (lazily read for .tif/.npy/.zarr where possible)."""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        if not path.exists():
            raise ValueError(f"expected an existing input file, got {path} (not found)")
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img)
    return read_stack(path)


def as_stack(data, rgb: str):
    """(N, H, W[, C]) view of the input and whether it was a single 2D image."""
    shape = tuple(data.shape)
    colour = len(shape) >= 3 and shape[-1] in (3, 4) and rgb != "no"
    if rgb == "yes" and not colour:
        raise ValueError(f"expected a last axis of size 3 or 4 with --rgb yes, got shape {shape}")
    spatial = len(shape) - colour
    expected = "(H, W), (H, W, 3|4), (N, H, W) or (N, H, W, 3|4)"
    if spatial not in (2, 3):
        raise ValueError(f"expected {expected}, got shape {shape}")
    check_image_size(shape, shape[spatial - 2:spatial], last_is_width=not colour, expected=expected)
    return (data[None], True) if spatial == 2 else (data, False)


def check_output(output: Path, input_path: Path) -> None:
    """Before any work: a label-image suffix, not the input (nor inside it, nor inside an
    embedding store), in a folder that exists (or is made now) and is writable."""
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"expected an output ending in .tif, .tiff or .npy, got {output.name}")
    refuse_overlap(output, "an output", {"input": input_path})
    if output.is_dir():
        raise ValueError(f"expected an output file, got the folder {output}")
    check_writable_folder(output, "the output", create=True)


def write_labels(output: Path, labels: np.ndarray) -> None:
    """Write ``labels`` to ``output`` (.tif/.tiff zlib-compressed, or .npy) atomically."""
    if output.suffix.lower() == ".npy":
        write_atomic(output, lambda f: np.save(f, labels, allow_pickle=False))
    else:
        import tifffile

        write_atomic(output, lambda f: tifffile.imwrite(f, labels, compression="zlib"))


def segmenter_options(args) -> dict:
    """SamInstanceSegmenter's keyword arguments for every mode from the command line,
    validated (ValueError) before any model is loaded."""
    import dataclasses

    from ..engine.instance_segmentation import AisParameters
    from ..engine.prompt_generation import ApgParameters

    def given(names) -> dict:  # options on the command line (None: the engine's default)
        values = {n: getattr(args, n) for n in names}
        return {n: v for n, v in values.items() if v is not None and v is not False}

    seeds = given(AIS_FLAGS)
    size = {} if args.min_size is None else {"min_size": args.min_size}
    ais = dataclasses.replace(AisParameters(), **seeds, **size)
    apg_values = {k: v for k, v in seeds.items() if k not in ("foreground_smoothing", "distance_smoothing")}
    apg_values.update(given((*APG_FLAGS, *APG_SWITCHES)))
    apg = dataclasses.replace(ApgParameters(), **apg_values, **size)
    ais.validate()
    apg.validate()
    return {"ais": ais, "apg": apg, "amg": {name: getattr(args, name) for name in GENERATOR_FLAGS},
            "amg_min_size": args.min_size or 0}


def run(args) -> int:
    def fail(code: int, message: str) -> int:
        print(f"napari-sam everything: error: {cli_wording(message)}", file=sys.stderr)
        return code

    output, input_path = Path(args.output), Path(args.input)
    try:
        check_output(output, input_path)
    except ValueError as exc:
        return fail(2, str(exc))

    from tqdm import tqdm

    from .. import engine
    from ..engine.instances import SamInstanceSegmenter, default_mode
    from ..engine.stack import StackView, volume_contrast_limits
    from ..engine.weights import CheckpointDownloadError
    from ..model.checkpoint import CheckpointError

    try:
        stack, single = as_stack(read_input(input_path), args.rgb)
        limits = tuple(args.contrast_limits) if args.contrast_limits else None
        if limits is None and not single and not args.store:  # one normalisation for every slice
            limits = volume_contrast_limits(StackView(stack))
    except (ValueError, OSError) as exc:
        return fail(2, f"cannot read {args.input}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so, no traceback
        return fail(2, f"cannot read {args.input}: {type(exc).__name__}: {exc}")
    try:
        options = segmenter_options(args)
    except ValueError as exc:
        return fail(2, str(exc))
    from ..model.zoo import zoo_model

    if args.mode in ("ais", "apg") and args.checkpoint is None and not zoo_model(args.model).has_decoder:
        return fail(2, f"--mode {args.mode} needs a model with an AIS decoder; {args.model} has none "
                       "(try vit_t_lm, vit_b_lm, …: napari-sam models)")
    try:
        model = engine.build_sam(args.model, args.checkpoint, decoder_checkpoint=args.decoder_checkpoint,
                                 device=args.device, precision=args.precision)
        mode = args.mode if args.mode != "auto" else default_mode(model)
        segmenter = SamInstanceSegmenter(model, mode, **options)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return fail(2, str(exc))
    except CheckpointDownloadError as exc:
        return fail(1, str(exc))

    embedding_for = None
    if args.store:
        from ..engine.store import EmbeddingStore, StoreError, StoreMismatchError

        try:  # the store's normalisation, unless given: its embeddings were made with it
            store = EmbeddingStore.open(args.store, stack, model, contrast_limits=limits or "stored")
        except StoreMismatchError as exc:
            hint = (" (or pass the store's --contrast-limits)" if "normalisation" in exc.changed else "")
            return fail(2, f"store {args.store} was made for a different {exc.details}: use the "
                           f"model and input it was made with, or another --store{hint}")
        except (ValueError, StoreError) as exc:
            return fail(2, str(exc))
        limits, embedding_for = store.contrast_limits, store.embedding
    job = segmenter.stack_job(stack, contrast_limits=limits, link_iou=args.link_iou,
                              embedding_for=embedding_for)
    bar = tqdm(total=0, unit="step", desc=f"everything ({segmenter.mode})", disable=args.quiet,
               file=sys.stderr)
    try:
        with bar:
            while True:
                try:
                    step = next(job)
                except StopIteration as stop:
                    labels = stop.value
                    break
                bar.total = step.total
                bar.set_postfix_str(step.message, refresh=False)
                bar.update(step.done - bar.n)
    except ValueError as exc:
        return fail(2, str(exc))
    except RuntimeError as exc:  # e.g. a store that cannot be read or written (StoreError)
        return fail(1, str(exc))
    labels = labels[0] if single else labels
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    try:
        write_labels(output, labels.astype(dtype))
    except OSError as exc:
        return fail(1, f"cannot write {output}: {exc.strerror or exc}; an earlier file there "
                       "is unchanged")
    n = int(np.count_nonzero(np.unique(labels)))
    print(f"{n} objects in {output} ({labels.shape}, {np.dtype(dtype).name})", file=sys.stderr)
    return 0
