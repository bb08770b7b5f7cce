"""napari-sam embed INPUT --store OUT.zarr: precompute a stack's embeddings on disk.

Run it on a bigger machine, a cluster or overnight; the viewer then opens the store and
segments without encoding. Rerunning resumes: slices (tiles) already stored are not
encoded again. A store made for other data, another model, another normalisation or
another tiling is refused (nothing is deleted) unless --on-mismatch recompute, which
clears what the store wrote and encodes again. Upgrading napari-sam keeps stores valid.

INPUT is a stack (N, H, W) / (N, H, W, 3|4) or one 2D image (H, W) / (H, W, 3|4).
Large images are cut into overlapping tiles, each encoded at full resolution (--tiling
auto: when the longest side exceeds 1.5 model inputs; --tile-shape, --halo). Only the
tile being encoded is read from a .zarr or memory-mappable .tif/.npy.

Normalisation: one pair of contrast limits for the whole stack, by default robust
percentiles of sampled slices (tiles) ("auto", what the viewer uses for a new store too),
or --contrast-limits LOW HIGH.

Many processes or machines: --workers N starts a local Dask cluster of N worker
processes (one thread each); --scheduler ADDRESS uses an existing dask.distributed
cluster (its workers must see INPUT, the checkpoint and the store at the same paths).
Each worker loads the model once; every slice (tile) is a task written straight into the
store, so a failed or killed worker loses only its task and a rerun completes the store.

Exit codes: 0 done, 1 failed while computing/writing (e.g. disk full: stored slices stay
valid, rerun to resume; weights download; a worker failed), 2 bad input or arguments (or
a store made for something else, or unreadable, or an unreachable scheduler), 130
interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from . import add_model_arguments, add_tiling_arguments, cli_wording, tiling_flags
from .files import check_image_size, check_writable_folder, read_stack, refuse_overlap

__all__ = ["add_parser", "read_stack", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="precompute the SAM embeddings of a stack into a store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="stack or image: .tif/.tiff, .npy or a .zarr array; (N, H, W) "
                                 "grayscale or (N, H, W, 3|4) colour, or one (H, W) / (H, W, 3|4) image")
    p.add_argument("--store", required=True, help="output store folder (e.g. stack.zarr)")
    add_model_arguments(p)
    p.add_argument("--axis", type=int, default=0, help="stack axis (z or t) of INPUT (default 0)")
    p.add_argument("--center", type=int, help="encode this slice and its neighbours first")
    p.add_argument("--contrast-limits", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="map LOW..HIGH to 0..255 (default: robust percentiles of the stack)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="storage precision (default float16)")
    p.add_argument("--on-mismatch", default="error", choices=("error", "recompute"),
                   help="if the store was made for other data, another model or another "
                        "normalisation: refuse (default) or clear it and recompute")
    add_tiling_arguments(p, "encoded")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="encode on a local Dask cluster of N worker processes (default: in "
                            "this process)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="encode on an existing dask.distributed cluster (e.g. tcp://host:8786)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def open_input(path: str, single: bool):
    """The input, read lazily (also in Dask workers, which get its path): a stack, or a
    one-slice stack of a 2D image."""
    data = read_stack(Path(path))
    if single:
        from ..engine.stack import single_image_stack

        return single_image_stack(data)
    return data


def is_single_image(shape: tuple[int, ...], axis: int) -> bool:
    """(H, W), or (H, W, 3|4) unless the last axis is the stack axis: one 2D image."""
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4) and axis % 3 != 2)


def run(args) -> int:
    def fail(code: int, message: str) -> int:
        print(f"napari-sam embed: error: {cli_wording(message)}", file=sys.stderr)
        return code

    store_path = Path(args.store)
    try:  # before any reading or model loading: where the store goes
        refuse_overlap(store_path, "a --store", {"input": Path(args.input)})
        if store_path.exists() and not store_path.is_dir():
            raise ValueError(f"expected a folder for --store, got the file {store_path}")
        check_writable_folder(store_path / ".napari-sam-store", "the --store", create=False)
    except ValueError as exc:
        return fail(2, str(exc))

    from ..engine.stack import StackView

    try:
        tile_shape, halo = tiling_flags(args)
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"expected --workers N >= 1, got {args.workers}")
    except ValueError as exc:
        return fail(2, str(exc))
    try:
        data = read_stack(Path(args.input))
        single = is_single_image(tuple(data.shape), args.axis)
        stack = open_input(args.input, single) if single else data
    except (ValueError, OSError) as exc:
        return fail(2, f"cannot read {args.input}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so, no traceback
        return fail(2, f"cannot read {args.input}: {type(exc).__name__}: {exc}")
    expected = "a stack (N, H, W), (N, H, W, 3|4) or an image (H, W), (H, W, 3|4)"
    try:
        if single and args.axis != 0:
            raise ValueError(f"expected no --axis for a 2D image, got --axis {args.axis} for shape "
                             f"{tuple(data.shape)}")
        if len(data.shape) not in (2, 3, 4):
            raise ValueError(f"expected {expected}, got shape {tuple(data.shape)}")
        view = StackView(stack, 0 if single else args.axis)
        shape = tuple(data.shape)
        check_image_size(shape, view.slice_shape,
                         last_is_width=len(shape) == 3 and view.axis != 2 and not single,
                         expected=expected)
    except ValueError as exc:
        return fail(2, f"{args.input}: {exc}")
    n = len(view)
    center = n // 2 if args.center is None else args.center
    if not 0 <= center < n:
        return fail(2, f"expected --center in [0, {n - 1}], got {center}")
    with contextlib.ExitStack() as resources:  # the cluster, closed on any exit
        client = None
        if args.workers is not None or args.scheduler is not None:
            try:  # before loading the model: an unreachable scheduler is a bad argument
                client = _start_cluster(args, resources)
            except _ClusterStartError as exc:
                return fail(2, str(exc))
        return _embed(args, fail, stack, view, single, center, (tile_shape, halo), client)


def _embed(args, fail, stack, view, single: bool, center: int, tiling, client) -> int:
    """Load the model, open the store, encode what is missing (in process, or on ``client``'s
    cluster); the exit code."""
    from tqdm import tqdm

    from .. import engine
    from ..engine.store import (
        EmbeddingStore,
        StoreError,
        StoreMismatchError,
        StoreReadError,
    )
    from ..engine.weights import CheckpointDownloadError
    from ..model.checkpoint import CheckpointError

    try:
        model = engine.build_sam(args.model, args.checkpoint, device=args.device,
                                 precision=args.precision,
                                 decoder_checkpoint=args.decoder_checkpoint)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return fail(2, str(exc))
    except CheckpointDownloadError as exc:
        return fail(1, str(exc))
    store_path = Path(args.store)
    tile_shape, halo = tiling
    try:
        store = EmbeddingStore.open(store_path, stack, model, axis=view.axis,
                                    contrast_limits=args.contrast_limits or "auto",
                                    dtype=args.dtype, on_mismatch=args.on_mismatch,
                                    tiling=args.tiling or "stored", tile_shape=tile_shape, halo=halo)
    except StoreMismatchError as exc:
        resume = (" (or pass the store's --contrast-limits to resume it)"
                  if exc.changed == ("normalisation",) else "")
        return fail(2, f"store {store_path} was made for a different {exc.details}: rerun with "
                       "--on-mismatch recompute to clear it and encode again, or choose "
                       f"another --store{resume}")
    except (ValueError, StoreReadError) as exc:
        return fail(2, str(exc))
    except StoreError as exc:
        return fail(1, str(exc))
    print(store.status.message, file=sys.stderr)
    unit = "slice" if store.grid is None else "tile"
    if store.grid is not None:
        print(f"{store.n_tiles} tiles of {store.grid.tile_hw[0]}x{store.grid.tile_hw[1]} pixels "
              f"per slice ({store.n_items} in all)", file=sys.stderr)
    try:
        if store.status.state == "reused" and store.ready.any():
            damaged = _consume(store.verify(), tqdm, int(store.ready.sum()), "verify", args.quiet, unit)
            if damaged:
                print(f"{damaged} damaged {unit}(s) will be recomputed", file=sys.stderr)
        bar = tqdm(total=store.n_items, initial=int(store.ready.sum()), unit=unit, desc="embed",
                   disable=args.quiet, file=sys.stderr)
        with bar:
            if client is not None:
                jobs = _cluster_jobs(args, store, single, center, client)
            else:
                jobs = store.precompute(center=center)
            result = _consume_into(jobs, bar)
    except StoreError as exc:
        return fail(1, str(exc))
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            store.refresh()  # what workers stored before the cluster closed
        print(f"napari-sam embed: interrupted; {int(store.ready.sum())}/{store.n_items} {unit}s are "
              "stored, run the same "
              "command again to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        return fail(2, str(exc))
    except RuntimeError as exc:  # WorkerError: a task failed on a worker
        store.refresh()
        return fail(1, f"{exc}; {int(store.ready.sum())}/{store.n_items} {unit}s are stored and "
                       "valid, run the same "
                       "command again to resume")
    print(f"{result.n_ready}/{result.n_slices} {unit}s ready in {args.store} ({result.n_computed} "
          f"encoded in {result.seconds:.1f} s)", file=sys.stderr)
    return 0


class _ClusterStartError(Exception):
    """The cluster could not be started or reached."""


def _start_cluster(args, resources: contextlib.ExitStack):
    """A Client of a LocalCluster (--workers) or an existing cluster (--scheduler), closed
    when ``resources`` closes."""
    from ..engine.distributed import open_cluster

    where = f"--scheduler {args.scheduler}" if args.scheduler else f"--workers {args.workers}"
    try:
        return resources.enter_context(open_cluster(args.workers, args.scheduler))
    except (OSError, TimeoutError, ValueError) as exc:
        raise _ClusterStartError(f"cannot start or reach the Dask cluster ({where}): "
                                 f"{type(exc).__name__}: {exc}") from None


def _cluster_jobs(args, store, single: bool, center: int, client):
    """precompute_on_cluster: workers re-open INPUT by its path, load the model once each."""
    from functools import partial

    from ..engine.distributed import ModelSpec, StoreWork, precompute_on_cluster

    spec = ModelSpec(args.model, _path(args.checkpoint), _path(args.decoder_checkpoint),
                     args.device, args.precision)
    work = StoreWork.of(store, partial(open_input, str(Path(args.input).absolute()), single), spec)
    return precompute_on_cluster(store, client, work, center)


def _path(value) -> str | None:
    return None if value is None else str(Path(value).expanduser().absolute())


def _consume_into(gen, bar):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
        bar.update(1)


def _consume(gen, tqdm, total: int, desc: str, quiet: bool, unit: str):
    with tqdm(total=total, unit=unit, desc=desc, disable=quiet, file=sys.stderr) as bar:
        return _consume_into(gen, bar)
