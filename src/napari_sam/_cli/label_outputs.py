"""Where ``napari-sam everything`` writes its labels, without holding them in RAM.

Every output follows one protocol, so the work writes slice by slice into ``open()``'s
array and nothing is visible at the target until ``commit()``:

* ``check()`` — before any model loads: the target can be written (ValueError otherwise);
* ``open(shape, chunks_hw)`` — an (N, H, W) or (H, W) uint32 array-like to fill, in a
  hidden temporary beside the target;
* ``commit(max_label)`` — the finished labels replace the target in one rename;
* ``abort()`` — removes the temporary; an earlier target is untouched.

:class:`FileLabels` (.tif/.tiff/.npy: written from a temporary zarr one slice at a time,
uint16 when the ids fit, else uint32), :class:`ZarrLabels` (a chunked uint32 zarr array,
one chunk per slice and tile-sized block) and :class:`~napari_sam._cli.ome_zarr.OmeLabels`
(labels inside an OME-Zarr image).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .files import check_writable_folder, refuse_overlap, write_atomic

FILE_SUFFIXES = (".tif", ".tiff", ".npy")
MARKER = "napari-sam"  # attribute naming the zarr outputs we wrote (and may replace)


def _temporary(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.{kind}"


def _create(path: Path, shape: tuple[int, ...], chunks_hw: tuple[int, int], attributes: dict):
    """A new uint32 zarr array (format 2: readable by every zarr library) at ``path``, one
    chunk per slice and ``chunks_hw`` block."""
    import zarr

    chunks = (1,) * (len(shape) - 2) + tuple(min(s, c) for s, c in zip(shape[-2:], chunks_hw))
    array = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint32",
                              fill_value=0, zarr_format=2)
    array.attrs.update(attributes)
    return array


class FileLabels:
    """A .tif/.tiff (zlib) or .npy label image, written atomically from a temporary zarr."""

    def __init__(self, target: Path, input_path: Path) -> None:
        self.target, self.input_path = Path(target), Path(input_path)
        self.scratch: Path | None = None
        self.extra: dict = {}  # a TIFF / .npy records nothing

    def check(self) -> None:
        if self.target.suffix.lower() not in FILE_SUFFIXES:
            raise ValueError(f"expected an output ending in .tif, .tiff, .npy or .zarr, got "
                             f"{self.target.name}")
        refuse_overlap(self.target, "an output", {"input": self.input_path})
        if self.target.is_dir():
            raise ValueError(f"expected an output file, got the folder {self.target}")
        check_writable_folder(self.target, "the output", create=True)

    def open(self, shape, chunks_hw):
        self.scratch = _temporary(self.target, "part.zarr")
        self.array = _create(self.scratch, tuple(shape), chunks_hw, {})
        return self.array

    def commit(self, max_label: int) -> None:
        dtype = np.dtype(np.uint16 if max_label <= np.iinfo(np.uint16).max else np.uint32)
        self.dtype, array, shape = dtype, self.array, tuple(self.array.shape)
        planes = (range(shape[0]) if len(shape) == 3 else [slice(None)])

        def pages():
            for z in planes:
                yield np.asarray(array[z]).astype(dtype)

        if self.target.suffix.lower() == ".npy":
            def write(f):
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for page in pages():
                    f.write(np.ascontiguousarray(page).tobytes())
        else:
            import tifffile

            def write(f):
                tifffile.imwrite(f, pages(), shape=shape, dtype=dtype, photometric="minisblack",
                                 compression="zlib")
        try:
            write_atomic(self.target, write)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


class ZarrLabels:
    """A chunked uint32 zarr array folder (``labels.zarr``), renamed into place when done.

    An existing folder is replaced only with ``overwrite`` and only if napari-sam wrote it
    (its attributes say so): a folder that looks different is never deleted.
    """

    def __init__(self, target: Path, input_path: Path, overwrite: bool = False,
                 extra: dict | None = None) -> None:
        self.target, self.input_path = Path(target), Path(input_path)
        self.overwrite, self.extra = overwrite, extra or {}
        self.tmp: Path | None = None

    def check(self) -> None:
        refuse_overlap(self.target, "an output", {"input": self.input_path})
        if self.target.exists():
            if not self.target.is_dir():
                raise ValueError(f"expected a folder for a .zarr output, got the file {self.target}")
            if not self.overwrite:
                raise ValueError(f"expected a new output, got {self.target}, which exists (pass "
                                 "--overwrite to replace labels napari-sam wrote there)")
            if not ours(self.target):
                raise ValueError(f"expected labels written by napari-sam at {self.target} to "
                                 "replace, got a folder napari-sam did not write: it is left "
                                 "alone (remove it yourself, or choose another --output)")
        check_writable_folder(self.target, "the output", create=True)

    def open(self, shape, chunks_hw):
        self.tmp = _temporary(self.target, "part")
        return _create(self.tmp, tuple(shape), chunks_hw, {MARKER: {"kind": "labels", **self.extra}})

    def commit(self, max_label: int) -> None:
        old = None
        if self.target.exists():
            if not ours(self.target):  # appeared during the run: never ours to delete
                raise OSError(f"{self.target} appeared during the run; labels left in {self.tmp}")
            old = _temporary(self.target, "old")
            os.replace(self.target, old)
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            if old is not None:
                os.replace(old, self.target)
            raise
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def ours(path: Path) -> bool:
    """Whether the zarr array at ``path`` carries napari-sam's marker attribute."""
    import json

    for name in (".zattrs", "zarr.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((Path(path) / name).read_text())
            data = data.get("attributes", {}) if name == "zarr.json" else data
            if isinstance(data.get(MARKER), dict) and data[MARKER].get("kind") == "labels":
                return True
    return False


class LabelCounter:
    """Writes into ``out`` ((N, H, W) array-like) and counts the ids written: ``max_label``
    and ``n_objects`` without reading the output back."""

    def __init__(self, out) -> None:
        self.out, self.shape, self.dtype = out, tuple(out.shape), np.dtype(out.dtype)
        self.max_label, self._ids = 0, set()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        return self.out[key]

    def __setitem__(self, key, value) -> None:
        value = np.asarray(value)
        self.out[key] = value
        ids = np.unique(value)
        ids = ids[ids > 0]
        self._ids.update(ids.tolist())
        self.max_label = max(self.max_label, int(ids.max(initial=0)))

    @property
    def n_objects(self) -> int:
        return len(self._ids)
