"""napari-sam everything INPUT -o LABELS: segment everything, without a viewer.

--mode ais (the default for models with an instance decoder, e.g. --model vit_b_lm):
micro-sam's automatic instance segmentation, seconds per slice on a CPU; apg: prompts from
that decoder, decoded by SAM; amg (the default otherwise): SAM's point grid, slow on a CPU.

INPUT is a 2D image ((H, W) grayscale or (H, W, 3|4) colour) or a stack ((N, H, W) or
(N, H, W, 3|4)) in .tif/.tiff, .png/.jpg, .npy, a .zarr array, or an OME-Zarr image (NGFF
0.4/0.5: --level K picks a resolution level, default 0 = full resolution; --channel K one
channel). Inputs are read lazily: only the slice (and tile) being segmented is in memory.
A stack is segmented slice by slice and objects overlapping in consecutive slices share one
id (--link-iou). Images larger than 1.5 model inputs are cut into overlapping tiles of the
model's input size (--tiling, --tile-shape, --halo), segmented tile by tile and stitched.

The output has the input's spatial shape: .tif/.tiff or .npy (uint16, or uint32 above 65535
objects), or .zarr (a chunked uint32 zarr array, one chunk per slice and tile). For an
OME-Zarr input, -o left out (or --ome-labels NAME) writes INPUT/labels/NAME (default
napari-sam): NGFF labels over the image at each of its levels. Labels stream to disk slice by
slice into a temporary beside the target, renamed when complete: an interrupted run leaves an
earlier output intact. Never over the input; an existing .zarr output or OME label is replaced
only with --overwrite. Images must be at least 8 x 8 pixels.

Many machines: --workers N (a local Dask cluster of N processes) or --scheduler ADDRESS (an
existing one) segments slices as tasks, each worker loading the model once; slices are
linked here as they land. Same labels as in one process.

Exit codes: 0 done, 1 failed while computing or writing (e.g. weights download), 2 bad
input or arguments (checked before any model is loaded, the output folder included),
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import numpy as np

from . import add_model_arguments, add_tiling_arguments, cli_wording, tiling_flags
from .cluster import add_cluster_arguments, check_cluster_arguments, cluster_job
from .everything_io import (
    DEFAULT_OME_LABELS,
    MAX_CHUNK_SIDE,
    as_stack,
    file_output,
    ome_output,
    open_stack,
    plane_of,
    read_input,
)
from .files import AxisView
from .label_outputs import LabelCounter

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
    p.add_argument("input", help="image or stack: .tif/.tiff, .png/.jpg, .npy, .zarr or OME-Zarr")
    p.add_argument("-o", "--output", help="output labels: .tif/.tiff, .npy or .zarr (required "
                                          "unless INPUT is OME-Zarr: see --ome-labels)")
    p.add_argument("--ome-labels", metavar="NAME", help="OME-Zarr input: write INPUT/labels/NAME "
                   f"(the default without -o, NAME {DEFAULT_OME_LABELS})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing .zarr output or OME label of that name")
    p.add_argument("--level", type=int, metavar="K",
                   help="OME-Zarr input: resolution level (default 0, full resolution)")
    p.add_argument("--channel", type=int, metavar="K", help="OME-Zarr input: the channel to segment")
    add_tiling_arguments(p, "segmented and stitched")
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
    add_cluster_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def tiling_options(args, plane_hw: tuple[int, int], image_size: int | None = None):
    """(keyword arguments of the segmenter's tiling, the TileGrid or None) of the command
    line, validated (ValueError). ``image_size``: the model's input side (default: that of
    ``--model``'s architecture, known before the model loads)."""
    from ..engine.tiling import tile_grid
    from ..model.config import MODEL_CONFIGS
    from ..model.zoo import ZOO

    tile, halo = tiling_flags(args)
    size = image_size or MODEL_CONFIGS[ZOO[args.model].architecture].img_size
    tiling = args.tiling or "auto"
    return {"tiling": tiling, "tile_shape": tile, "halo": halo}, tile_grid(plane_hw, size, tiling, tile, halo)


def open_store(args, stack, model, limits, tiling: dict):
    """(the store, embedding_for) of ``--store``: its normalisation unless
    --contrast-limits, its tiling unless tiling flags are given. ValueError: refused."""
    from ..engine.store import EmbeddingStore, StoreError, StoreMismatchError

    explicit = args.tiling is not None or args.tile_shape or args.halo
    try:  # the store's normalisation, unless given: its embeddings were made with it
        store = EmbeddingStore.open(args.store, stack, model, contrast_limits=limits or "stored",
                                    tiling=tiling["tiling"] if explicit else "stored",
                                    tile_shape=tiling["tile_shape"], halo=tiling["halo"])
    except StoreMismatchError as exc:
        hint = (" (or pass the store's --contrast-limits)" if "normalisation" in exc.changed else "")
        raise ValueError(f"store {args.store} was made for a different {exc.details}: use the "
                         f"model, input and tiling it was made with, or another --store{hint}") from None
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    if store.grid is None:
        return store, store.embedding
    return store, lambda z: (lambda k: store.tile_embedding(z, k))


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

    input_path = Path(args.input)
    try:  # before reading anything: where the labels go
        output = file_output(args, input_path)
        if output is not None:
            output.check()
    except ValueError as exc:
        return fail(2, str(exc))

    from tqdm import tqdm

    from .. import engine
    from ..engine.instances import SamInstanceSegmenter, default_mode
    from ..engine.stack import StackView, volume_contrast_limits
    from ..engine.tiled_predictor import resolve_tile_limits
    from ..engine.weights import CheckpointDownloadError
    from ..model.checkpoint import CheckpointError

    try:
        data, ome = read_input(input_path, args.level, args.channel)
        stack, single = as_stack(data, args.rgb)
    except (ValueError, OSError) as exc:
        return fail(2, f"cannot read {args.input}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so, no traceback
        return fail(2, f"cannot read {args.input}: {type(exc).__name__}: {exc}")
    try:
        if output is None:
            output = ome_output(args, ome, input_path)
            output.check()
        plane_hw = tuple(int(v) for v in stack.shape[1:3])
        tiling_options(args, plane_hw)  # refused now rather than after loading the model
        on_cluster = check_cluster_arguments(args)
        options = segmenter_options(args)
        limits = tuple(args.contrast_limits) if args.contrast_limits else None
        if limits is None and not single and not args.store:  # one normalisation for every slice
            limits = volume_contrast_limits(StackView(stack))
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
        tiling, grid = tiling_options(args, plane_hw, model.image_size)
        embedding_for = store = None
        if args.store:
            store, embedding_for = open_store(args, stack, model, limits, tiling)
            limits, grid = store.contrast_limits, store.grid
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return fail(2, str(exc))
    except CheckpointDownloadError as exc:
        return fail(1, str(exc))

    n, (h, w) = int(stack.shape[0]), plane_hw
    shape = (h, w) if single else (n, h, w)
    chunks = grid.tile_hw if grid is not None else (min(h, MAX_CHUNK_SIDE), min(w, MAX_CHUNK_SIDE))
    output.extra["mode"] = segmenter.mode  # recorded in zarr / OME-Zarr outputs
    try:
        out = output.open(shape, chunks)
    except OSError as exc:
        return fail(1, f"cannot write {output.target}: {exc.strerror or exc}")
    labels = LabelCounter(AxisView(out, new_axis=True) if single else out)
    where = (f" on {args.workers} workers" if args.workers else f" on {args.scheduler}") if on_cluster else ""
    try:
        with contextlib.ExitStack() as context:
            if on_cluster:  # slices (or a single image's tiles) as tasks
                source = functools.partial(open_stack, str(input_path.resolve()), args.level,
                                           args.channel, args.rgb)
                if single and grid is not None and limits is None:  # one normalisation, as in process
                    limits = resolve_tile_limits(plane_of(data), grid, "auto")
                job = context.enter_context(cluster_job(
                    args, source, segmenter, options, limits, {**tiling, "grid": grid}, store,
                    labels, output.target, plane=out if single and grid is not None else None))
            elif single and grid is not None:  # one large image: read and written tile by tile
                job = segmenter.job(plane_of(data), contrast_limits=limits, grid=grid, out=out,
                                    embedding_for=embedding_for(0) if embedding_for else None)
            else:
                job = segmenter.stack_job(stack, contrast_limits=limits, link_iou=args.link_iou,
                                          embedding_for=embedding_for, out=labels, **tiling, grid=grid)
            code, value = _run(job, tqdm, f"everything ({segmenter.mode}){where}", args.quiet, fail)
        if code == 0 and value is None:
            code = fail(1, "the work stopped before the end; nothing was written")
        count = getattr(value, "count", None)  # stitched tiles: K objects, ids 1..K
        n_objects, max_label = (labels.n_objects, labels.max_label) if count is None else (count, count)
        if code == 0:
            output.commit(max_label)
    except OSError as exc:
        output.abort()
        return fail(1, f"cannot write {output.target}: {exc.strerror or exc}; an earlier output "
                       "there is unchanged")
    except RuntimeError as exc:  # the cluster could not be started or reached
        output.abort()
        return fail(1, str(exc))
    except BaseException:
        output.abort()
        raise
    if code != 0:
        output.abort()
        return code
    dtype = getattr(output, "dtype", np.dtype(np.uint32))
    print(f"{n_objects} objects in {output.target} ({shape}, {np.dtype(dtype).name})",
          file=sys.stderr)
    return 0


def _run(job, tqdm, desc: str, quiet: bool, fail) -> tuple[int, object]:
    """Run the segmentation ``job`` with a progress bar: (0, its value), or (fail()'s exit
    code, None)."""
    bar = tqdm(total=0, unit="step", desc=desc, disable=quiet, file=sys.stderr)
    try:
        with bar:
            while True:
                try:
                    step = next(job)
                except StopIteration as stop:
                    return 0, stop.value
                bar.total = step.total
                bar.set_postfix_str(step.message, refresh=False)
                bar.update(step.done - bar.n)
    except ValueError as exc:
        return fail(2, str(exc)), None
    except RuntimeError as exc:  # e.g. a store that cannot be read or written (StoreError)
        return fail(1, str(exc)), None

