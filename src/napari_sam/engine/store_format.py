"""The on-disk format of embedding stores: zarr helpers, signatures and their comparison.

Used by :mod:`napari_sam.engine.store` (see its docstring for the layout and the write
protocol). Reading helpers here never write.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .image import ROBUST_PERCENTILES
from .predictor import _model_signature
from .stack import StackView, data_hash
from .tiling import TileGrid, tile_grid

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = ".napari-sam-store"
ATTRS_KEY = "napari_sam_store"
# recorded in the signature for information, never compared
INFO_KEYS = ("package_version",)
# differences that make stored features unusable for this model/stack, even read-only
TILINGS = ("off", "auto", "on", "stored")
UNUSABLE_KEYS = ("format", "model", "image_size", "original_size", "input_size", "storage_dtype",
                 "tiling")


def _resolve_grid(path: Path, view: StackView, image_size: int, tiling, tile_shape, halo
                  ) -> TileGrid | None:
    """The :class:`TileGrid` of each slice (None: untiled) for ``tiling`` "off" | "auto" |
    "on" | "stored" (the store's own at ``path``, else "auto") | a TileGrid."""
    if isinstance(tiling, TileGrid):
        if tuple(tiling.image_hw) != tuple(view.slice_shape):
            raise ValueError(f"expected a tile grid of {tuple(view.slice_shape)} slices, got one "
                             f"of {tuple(tiling.image_hw)}")
        return tiling
    if not isinstance(tiling, str) or tiling not in TILINGS:
        raise ValueError(f"expected tiling in {TILINGS} or a TileGrid, got {tiling!r}")
    if tiling == "stored":
        stored = stored_tiling(path, default="auto")
        if isinstance(stored, dict):
            try:
                return TileGrid(view.slice_shape, stored["tile_shape"], stored["halo"])
            except (KeyError, TypeError, ValueError):
                stored = "auto"  # unreadable: opening it reports the mismatch
        tiling = stored
    return tile_grid(view.slice_shape, image_size, tiling, tile_shape, halo)


def make_signature(view, model, contrast_limits, grid, input_size, storage_dtype: str,
                   hashed: str | None = None) -> dict:
    """What a store of ``view`` (a :class:`~napari_sam.engine.stack.StackView`) is: see
    :mod:`napari_sam.engine.store`. ``hashed``: the data hash if known (else computed)."""
    from .. import __version__

    signature = {
        "format": FORMAT_VERSION,
        "data": {"hash": hashed or data_hash(view, grid=grid), "shape": list(view.shape),
                 "dtype": view.dtype.str, "axis": view.axis},
        "model": _model_signature(model),
        "image_size": int(model.image_size),
        "normalisation": {
            "contrast_limits": None if contrast_limits is None else list(contrast_limits),
            "percentiles": list(ROBUST_PERCENTILES),
        },
        "package_version": __version__,  # information only, see INFO_KEYS
        "original_size": list(view.slice_shape),
        "input_size": list(input_size),
        "storage_dtype": storage_dtype,
    }
    if grid is not None:  # an untiled store keeps the signature of 0.1.0
        signature["tiling"] = grid.as_dict()
    return signature


def read_store_info(path) -> dict | None:
    """What the store at ``path`` was made for, or None if there is no readable store there
    (for a widget to describe a store before opening it). Never writes.

    Returns the stored signature plus ``n_ready``: ``info["format"]``, ``info["data"]``
    (``hash``, ``shape``, ``dtype``, ``axis``), ``info["model"]`` (type:checkpoint sha256),
    ``info["image_size"]``, ``info["normalisation"]["contrast_limits"]`` ([low, high] or
    None — the normalisation to show the layer with), ``info["original_size"]`` ((H, W) of
    a slice), ``info["input_size"]`` (of one stored item: a slice, or a tile),
    ``info["storage_dtype"]``, ``info["package_version"]`` (the version that made it;
    information only), ``info["tiling"]`` (``{"tile_shape": [h, w], "halo": [h, w]}``;
    absent from untiled stores) and ``info["n_ready"]`` (items stored: slices x tiles).
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        return None
    try:
        group = _open_group(path, mode="r")
        info = dict(dict(group.attrs)[ATTRS_KEY])
        has_features = "features" in group
        info["n_ready"] = int((_read_flags(group["done"]) >= 0).sum()) if has_features else 0
        return info
    except Exception:  # noqa: BLE001
        return None


def stored_contrast_limits(path, default="auto"):
    """The normalisation recorded in the store at ``path``: (low, high) or None; ``default``
    when there is no readable store there (what ``contrast_limits="stored"`` resolves to)."""
    info = read_store_info(path)
    try:
        limits = info["normalisation"]["contrast_limits"]
        if limits is None:
            return None
        low, high = (float(v) for v in limits)
        return low, high
    except (KeyError, TypeError, ValueError):
        return default


def stored_tiling(path, default="auto"):
    """The tiling recorded in the store at ``path``: ``{"tile_shape": [h, w], "halo": [h,
    w]}``, or "off" for an untiled store; ``default`` when there is no readable store there
    (what ``tiling="stored"`` resolves to)."""
    info = read_store_info(path)
    if info is None:
        return default
    tiling = info.get("tiling")
    return tiling if isinstance(tiling, dict) else "off"


# ---------------------------------------------------------------- signatures in words
def _differences(stored: dict, signature: dict) -> tuple[str, ...]:
    """Signature keys whose values differ (:data:`INFO_KEYS` ignored)."""
    keys = list(signature) + [k for k in stored if k not in signature]
    return tuple(k for k in keys if k not in INFO_KEYS and stored.get(k) != signature.get(k))


def _stored_slice_count(stored: dict) -> int | None:
    try:
        data = stored["data"]
        return int(data["shape"][int(data["axis"])])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _short(value) -> str:
    """A value for a message: floats to 6 significant digits, long hex digests cut to 12
    characters."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return re.sub(r"([0-9a-f]{12})[0-9a-f]{20,}", r"\1…", str(value))


def _tiling_words(tiling) -> str:
    """{"tile_shape": [1024, 1024], "halo": [128, 128]} -> "1024x1024 tiles, halo 128x128"."""
    if not isinstance(tiling, dict):
        return "off"
    try:
        return (f"{'x'.join(str(int(v)) for v in tiling['tile_shape'])} tiles, halo "
                f"{'x'.join(str(int(v)) for v in tiling['halo'])}")
    except (KeyError, TypeError, ValueError):
        return _short(tiling)


def _describe(changed: tuple[str, ...], stored: dict, now: dict) -> str:
    """What differs, in words: "data (shape … in the store, … now); model (…)"."""

    def pair(a, b) -> str:
        return f"{_short(a)} in the store, {_short(b)} now"

    parts = []
    for key in changed:
        a, b = stored.get(key), now.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k} {pair(a.get(k), b.get(k))}" for k in ("shape", "dtype", "axis")
                    if a.get(k) != b.get(k)]
            parts.append(f"data ({'; '.join(diff) or 'same shape, other pixels'})")
        elif key == "normalisation" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k.replace('_', ' ')} {pair(a.get(k), b.get(k))}"
                    for k in ("contrast_limits", "percentiles") if a.get(k) != b.get(k)]
            parts.append(f"normalisation ({'; '.join(diff) or pair(a, b)})")
        elif key == "tiling":
            parts.append(f"tiling ({_tiling_words(a)} in the store, {_tiling_words(b)} now)")
        elif key == "input_size" and {"original_size", "image_size", "tiling"} & set(changed):
            continue  # follows from those
        else:
            label = {"format": "store format", "image_size": "model input size",
                     "original_size": "image size", "storage_dtype": "storage dtype"}.get(key, key)
            parts.append(f"{label} ({pair(a, b)})")
    return "; ".join(parts)


# ---------------------------------------------------------------- zarr 2 / 3 compatibility
def _zarr_v3() -> bool:
    import zarr

    return int(zarr.__version__.split(".")[0]) >= 3


def _open_group(path: Path, mode: str = "a"):
    import zarr

    if _zarr_v3():
        return zarr.open_group(str(path), mode=mode, zarr_format=2)
    return zarr.open_group(str(path), mode=mode)


def _create_array(group, name, shape, chunks, dtype, fill_value):
    # overwrite=False: only ever created where there is none (zarr's overwrite would empty
    # the whole sub-folder, a user's file in it included)
    if _zarr_v3():
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                  fill_value=fill_value, compressors=None, overwrite=False)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype,
                                fill_value=fill_value, compressor=None, overwrite=False)


_CHUNK_KEY = re.compile(r"\d+(\.\d+)*")
_ARRAY_METADATA = (".zarray", ".zattrs", ".zmetadata")


def _remove_array(folder: Path) -> None:
    """Delete a zarr-2 array we wrote: its metadata and chunk files, and the folder if that
    leaves it empty. Any other file (a user's) stays."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_file() and (entry.name in _ARRAY_METADATA or _CHUNK_KEY.fullmatch(entry.name)):
            entry.unlink()
    try:
        folder.rmdir()
    except OSError:  # something of the user's is in there: keep it
        log.warning("kept %s: it holds files napari-sam did not write", folder)


def _read_flags(done) -> np.ndarray:
    """(N,) int64 flags; a damaged flag chunk reads as missing (-1)."""
    try:
        return np.asarray(done[:], dtype=np.int64)
    except Exception:  # noqa: BLE001 - one bad chunk: read them one by one
        flags = np.full(done.shape[0], -1, dtype=np.int64)
        for i in range(done.shape[0]):
            try:
                flags[i] = int(done[i])
            except Exception:  # noqa: BLE001, S110 - a damaged flag: missing
                pass
        return flags
