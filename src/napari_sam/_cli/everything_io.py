"""Inputs and outputs of ``napari-sam everything`` (see everything.py): the input as a lazy
stack, the labels' destination."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import AxisView, check_image_size, open_input
from .label_outputs import FileLabels, ZarrLabels

DEFAULT_OME_LABELS = "napari-sam"
MAX_CHUNK_SIDE = 2048  # untiled planes: chunks of at most this many pixels a side


def read_input(path: Path, level: int | None = None, channel: int | None = None):
    """(pixels, OME-Zarr image or None) of the input, read lazily except .png/.jpg."""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        if not path.exists():
            raise ValueError(f"expected an existing input file, got {path} (not found)")
        if level is not None or channel is not None:
            raise ValueError(f"expected --level/--channel only with an OME-Zarr input, got {path.name}")
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img), None
    return open_input(path, level=level, channel=channel)


def as_stack(data, rgb: str):
    """(N, H, W[, C]) view of the input (lazy) and whether it was a single 2D image."""
    shape = tuple(data.shape)
    colour = len(shape) >= 3 and shape[-1] in (3, 4) and rgb != "no"
    if rgb == "yes" and not colour:
        raise ValueError(f"expected a last axis of size 3 or 4 with --rgb yes, got shape {shape}")
    spatial = len(shape) - colour
    expected = "(H, W), (H, W, 3|4), (N, H, W) or (N, H, W, 3|4)"
    if spatial not in (2, 3):
        raise ValueError(f"expected {expected}, got shape {shape}")
    check_image_size(shape, shape[spatial - 2:spatial], last_is_width=not colour, expected=expected)
    if isinstance(data, np.ndarray):
        return (data, False) if spatial == 3 else (data[None], True)
    return AxisView(data, new_axis=spatial == 2), spatial == 2  # zarr arrays have no len()


def open_stack(path: str, level: int | None, channel: int | None, rgb: str):
    """The input as ``run`` sees it ((N, H, W[, C]), lazy): what cluster workers re-open."""
    return as_stack(read_input(Path(path), level, channel)[0], rgb)[0]


def file_output(args, input_path: Path):
    """The -o output (FileLabels or ZarrLabels), or None when the labels go inside an
    OME-Zarr input (see :func:`ome_output`)."""
    if args.output is None:
        return None
    if args.ome_labels is not None:
        raise ValueError("expected either -o/--output or --ome-labels, got both")
    output = Path(args.output)
    if output.suffix.lower() == ".zarr":
        return ZarrLabels(output, input_path, args.overwrite, extra={"input": str(input_path)})
    return FileLabels(output, input_path)


def ome_output(args, image, input_path: Path):
    """INPUT/labels/NAME of an OME-Zarr input (``image``); ValueError for other inputs."""
    from .ome_zarr import OmeLabels

    if image is None:
        given = "--ome-labels" if args.ome_labels is not None else "no -o/--output"
        raise ValueError(f"expected -o/--output LABELS (.tif/.tiff, .npy or .zarr), got {given} "
                         f"with {input_path.name}, which is not an OME-Zarr image")
    return OmeLabels(image, args.ome_labels or DEFAULT_OME_LABELS, args.overwrite,
                     extra={"mode": args.mode, "model": args.model})


def plane_of(data):
    """A single (H, W[, C]) image as an array-like read region by region (zarr arrays and
    OME-Zarr views through :class:`AxisView`; numpy and memmaps as they are)."""
    return data if isinstance(data, np.ndarray) else AxisView(data)
