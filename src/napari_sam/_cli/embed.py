"""napari-sam embed INPUT --store OUT.zarr: precompute a stack's embeddings on disk.

Run it on a bigger machine or overnight; the viewer then opens the store and segments
without encoding. Rerunning resumes: slices already stored are not encoded again; a
store made for other data or another model is recomputed (or, with --on-mismatch error,
refused).

Exit codes: 0 done, 1 failed while computing/writing (e.g. disk full: stored slices stay
valid, rerun to resume), 2 bad input or arguments (or a store made for other data with
--on-mismatch error), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from . import add_model_arguments



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
    p.add_argument("--on-mismatch", default="recompute", choices=("recompute", "error"),
                   help="if the store was made for other data or another model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_stack(path: Path):
    """A lazily read array for ``path`` (memory-mapped or chunked where possible)."""
    if not path.exists():
        raise ValueError(f"expected an existing input file, got {path} (not found)")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.memmap(path, mode="r")
        except Exception:  # noqa: BLE001 - compressed/tiled: read it chunk-wise instead
            pass
        try:
            import zarr

            store = tifffile.imread(path, aszarr=True)
            array = zarr.open(store, mode="r")
            return array["0"] if hasattr(array, "keys") and "0" in array else array
        except Exception:  # noqa: BLE001 - last resort: read it whole
            return tifffile.imread(path)
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if suffix == ".zarr" or path.is_dir():
        import zarr

        array = zarr.open(str(path), mode="r")
        if not hasattr(array, "shape"):
            raise ValueError(f"expected a zarr array at {path}, got a group")
        return array
    raise ValueError(f"expected a .tif, .tiff, .npy or .zarr input, got {path.name}")


def run(args) -> int:
    from tqdm import tqdm

    from ..engine import build_sam
    from ..engine.stack import StackView
    from ..engine.store import EmbeddingStore, StoreError, StoreMismatchError
    from ..engine.weights import CheckpointDownloadError
    from ..model.checkpoint import CheckpointError

    def fail(code: int, message: str) -> int:
        print(f"napari-sam embed: error: {message}", file=sys.stderr)
        return code

    try:
        stack = read_stack(Path(args.input))
    except (ValueError, OSError) as exc:
        return fail(2, f"cannot read {args.input}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so, no traceback
        return fail(2, f"cannot read {args.input}: {type(exc).__name__}: {exc}")
    try:
        n = len(StackView(stack, args.axis))
    except ValueError as exc:
        return fail(2, f"{args.input}: {exc}")
    center = n // 2 if args.center is None else args.center
    if not 0 <= center < n:
        return fail(2, f"expected --center in [0, {n - 1}], got {center}")
    try:
        model = build_sam(args.model, args.checkpoint, device=args.device, precision=args.precision)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return fail(2, str(exc))
    except CheckpointDownloadError as exc:
        return fail(1, str(exc))
    try:
        store = EmbeddingStore.open(args.store, stack, model, axis=args.axis,
                                    contrast_limits=args.contrast_limits or "auto",
                                    dtype=args.dtype, on_mismatch=args.on_mismatch)
    except (ValueError, StoreMismatchError) as exc:
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
