"""napari-sam embed INPUT --store OUT.zarr: precompute a stack's embeddings on disk.

Run it on a bigger machine or overnight; the viewer then opens the store and segments
without encoding. Rerunning resumes: slices already stored are not encoded again. A store
made for other data, another model or another normalisation is refused (nothing is
deleted) unless --on-mismatch recompute, which clears what the store wrote and encodes
again. Upgrading napari-sam keeps stores valid.

Normalisation: one pair of contrast limits for the whole stack, by default robust
percentiles of the stack ("auto", what the viewer uses for a new store too), or
--contrast-limits LOW HIGH.

Exit codes: 0 done, 1 failed while computing/writing (e.g. disk full: stored slices stay
valid, rerun to resume; weights download), 2 bad input or arguments (or a store made for
something else, or unreadable), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_model_arguments, cli_wording
from .files import check_image_size, check_writable_folder, read_stack, refuse_overlap

__all__ = ["add_parser", "read_stack", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="precompute the SAM embeddings of a stack into a store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="stack: .tif/.tiff, .npy or a .zarr array; (N, H, W) "
                                 "grayscale or (N, H, W, 3|4) colour")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


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
        stack = read_stack(Path(args.input))
    except (ValueError, OSError) as exc:
        return fail(2, f"cannot read {args.input}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so, no traceback
        return fail(2, f"cannot read {args.input}: {type(exc).__name__}: {exc}")
    try:
        view = StackView(stack, args.axis)
        shape = tuple(view.shape)
        check_image_size(shape, view.slice_shape, last_is_width=len(shape) == 3 and view.axis != 2,
                         expected="a stack (N, H, W) or (N, H, W, 3|4)")
    except ValueError as exc:
        return fail(2, f"{args.input}: {exc}")
    n = len(view)
    center = n // 2 if args.center is None else args.center
    if not 0 <= center < n:
        return fail(2, f"expected --center in [0, {n - 1}], got {center}")

    from tqdm import tqdm

    from .. import engine
    from ..engine.store import (EmbeddingStore, StoreError, StoreMismatchError,
                                StoreReadError)
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
    try:
        store = EmbeddingStore.open(store_path, stack, model, axis=args.axis,
                                    contrast_limits=args.contrast_limits or "auto",
                                    dtype=args.dtype, on_mismatch=args.on_mismatch)
    except StoreMismatchError as exc:
        resume = (" (or pass the store's --contrast-limits to resume it)"
                  if "normalisation" in exc.changed else "")
        return fail(2, f"store {store_path} was made for a different {exc.details}: rerun with "
                       "--on-mismatch recompute to clear it and encode again, or choose "
                       f"another --store{resume}")
    except (ValueError, StoreReadError) as exc:
        return fail(2, str(exc))
    except StoreError as exc:
        return fail(1, str(exc))
    print(store.status.message, file=sys.stderr)
    try:
        if store.status.state == "reused" and store.ready.any():
            damaged = _consume(store.verify(), tqdm, int(store.ready.sum()), "verify", args.quiet)
            if damaged:
                print(f"{damaged} damaged slice(s) will be recomputed", file=sys.stderr)
        bar = tqdm(total=n, initial=int(store.ready.sum()), unit="slice", desc="embed",
                   disable=args.quiet, file=sys.stderr)
        with bar:
            gen = store.precompute(center=center)
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                bar.update(1)
    except StoreError as exc:
        return fail(1, str(exc))
    except KeyboardInterrupt:
        print(f"napari-sam embed: interrupted; {int(store.ready.sum())}/{n} slices are stored, "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        return fail(2, str(exc))
    print(f"{result.n_ready}/{n} slices ready in {args.store} ({result.n_computed} encoded "
          f"in {result.seconds:.1f} s)", file=sys.stderr)
    return 0


def _consume(gen, tqdm, total: int, desc: str, quiet: bool):
    with tqdm(total=total, unit="slice", desc=desc, disable=quiet, file=sys.stderr) as bar:
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
            bar.update(1)
