"""Files of the command line: reading inputs, checking outputs before the work, atomic writes.

Every check raises ``ValueError(f"expected …, got …")`` with a one-line message for the
user; the commands turn it into exit code 2 before any model is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Smallest image side accepted. Real images are far larger; axes of 2-7 are channels (2-4,
# RGB/RGBA), a few time points or z planes. Such an axis read as an image axis makes SAM
# segment 40 x 2 pixel "images" upsampled to 1024 px — never what was meant. 8 px keeps
# every plausible image (even a thumbnail or a small crop) and refuses those misreads.
MIN_IMAGE_SIDE = 8

NPY_MAGIC = b"\x93NUMPY"
STORE_MARKER = ".napari-sam-store"  # see napari_sam.engine.store.MARKER


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (messages of numpy/zarr/tifffile can be long)."""
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------- inputs
class AxisView:
    """A lazy view of an N-D array-like (zarr, memmap, numpy…): some of its axes held at one
    index (``fixed``: {axis: index}), the others kept in order, optionally behind a new
    leading axis of length 1 (``new_axis``: a 2D image seen as a one-slice stack).

    Indexing with integers and slices (and ``...``) reads, or writes, only the selected
    region of the underlying array; results are numpy arrays. Shapes: the underlying
    shape less the fixed axes (plus the leading 1).
    """

    def __init__(self, array, fixed: dict[int, int] | None = None, new_axis: bool = False) -> None:
        self.array, self.new_axis = array, bool(new_axis)
        shape = tuple(int(s) for s in array.shape)
        self.fixed = {int(a) % len(shape): int(i) for a, i in (fixed or {}).items()}
        for axis, index in self.fixed.items():
            if not 0 <= index < shape[axis]:
                raise ValueError(f"expected an index in [0, {shape[axis] - 1}] on axis {axis}, "
                                 f"got {index}")
        self.kept = tuple(a for a in range(len(shape)) if a not in self.fixed)
        self.shape = (1,) * self.new_axis + tuple(shape[a] for a in self.kept)
        self.dtype = np.dtype(array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _source_key(self, key) -> tuple[tuple, bool]:
        """(key of the underlying array, whether the new leading axis stays in the result)."""
        key = list(key) if isinstance(key, tuple) else [key]
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key[at:at + 1] = [slice(None)] * (self.ndim - len(key) + 1)
        key += [slice(None)] * (self.ndim - len(key))
        if len(key) != self.ndim or not all(isinstance(k, (slice, int, np.integer)) for k in key):
            raise IndexError(f"expected up to {self.ndim} integers or slices, got {key!r}")
        keep_new = False
        if self.new_axis:
            first, key = key[0], key[1:]
            if isinstance(first, slice):
                keep_new = len(range(1)[first]) == 1
                if not keep_new:
                    raise IndexError(f"expected a non-empty selection, got {first}")
            elif int(first) not in (0, -1):
                raise IndexError(f"expected index 0 on an axis of length 1, got {first}")
        source = [slice(None)] * len(self.array.shape)
        for axis, index in self.fixed.items():
            source[axis] = index
        for axis, k in zip(self.kept, key):
            source[axis] = k
        return tuple(source), keep_new

    def __getitem__(self, key) -> np.ndarray:
        source, keep_new = self._source_key(key)
        out = np.asarray(self.array[source])
        return out[None] if keep_new else out

    def __setitem__(self, key, value) -> None:
        source, keep_new = self._source_key(key)
        value = np.asarray(value)
        self.array[source] = value[0] if keep_new and value.ndim == len(self.shape) else value

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # whole: only for small data
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def read_stack(path: Path, *, level: int | None = None, channel: int | None = None):
    """A lazily read array for ``path`` (.tif/.tiff, .npy, a zarr array folder, an OME-Zarr
    image group), memory-mapped or chunked where possible. Raises ValueError saying what
    the file is not. ``level`` / ``channel``: see :func:`open_input`."""
    return open_input(path, level=level, channel=channel)[0]


def open_input(path: Path, *, level: int | None = None, channel: int | None = None):
    """(pixels, OME-Zarr image or None) of ``path``: pixels are a lazily read array-like
    ((H, W[, C]) or (N, H, W[, C])); for an OME-Zarr image group (NGFF 0.4 / 0.5) they are
    its resolution ``level`` (default 0, full resolution) with ``channel`` picked and axes
    of length 1 dropped (see :mod:`napari_sam._cli.ome_zarr`). ``level`` and ``channel``
    are refused for other inputs."""
    from .ome_zarr import is_ome_zarr, open_ome_zarr

    path = Path(path)
    if not path.exists():
        raise ValueError(f"expected an existing input file, got {path} (not found)")
    if path.is_dir() and is_ome_zarr(path):
        image = open_ome_zarr(path, level=level, channel=channel)
        array = image.pixels()
        check_pixels(path, array)
        return array, image
    for name, value in (("--level", level), ("--channel", channel)):
        if value is not None:
            raise ValueError(f"expected {name} only with an OME-Zarr image input, got it with "
                             f"{path.name}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".zarr":
        array = read_zarr(path)
    elif suffix in (".tif", ".tiff"):
        array = read_tiff(path)
    elif suffix == ".npy":
        array = read_npy(path)
    else:
        raise ValueError(f"expected a .tif, .tiff, .npy or .zarr input, got {path.name}")
    check_pixels(path, array)
    return array, None


def read_tiff(path: Path):
    import tifffile

    with contextlib.suppress(Exception):  # compressed/tiled: read it chunk-wise instead
        return tifffile.memmap(path, mode="r")
    try:
        import zarr

        store = tifffile.imread(path, aszarr=True)
        array = zarr.open(store, mode="r")
        return array["0"] if hasattr(array, "keys") and "0" in array else array
    except Exception:  # noqa: BLE001 - last resort: read it whole
        return tifffile.imread(path)


def read_npy(path: Path):
    """A memory-mapped .npy array; never unpickles anything."""
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        raise ValueError(f"{path.name} is not a valid .npy array file (no NumPy header); "
                         "expected an array saved with numpy.save")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if re.search(r"pickle|Python objects|[Oo]bject arrays", str(exc)):
            raise ValueError(f"{path.name} is not a valid .npy array file for images: it holds "
                             "Python objects, which napari-sam never loads; expected a numeric "
                             "array") from None
        raise ValueError(f"{path.name} is not a valid .npy array file ({first_line(exc)})") from None


def read_zarr(path: Path):
    """A zarr array (format 2 or 3) at ``path``; a group or another folder is refused."""
    if not path.is_dir():
        raise ValueError(f"expected a zarr folder, got the file {path}")
    if (path / STORE_MARKER).is_file():
        raise ValueError(f"{path} is a napari-sam embedding store, not an image: expected the "
                         "image it was made from")
    if not any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json")):
        raise ValueError(f"{path} is not a zarr array or group (no .zarray, .zgroup or "
                         "zarr.json in it)")
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - damaged metadata: say so, no traceback
        raise ValueError(f"{path} is not a readable zarr array or group ({first_line(exc)})") from None
    if hasattr(node, "shape"):
        return node
    try:
        names = sorted(name for name, _ in node.arrays())
    except Exception:  # noqa: BLE001
        names = []
    hint = f"; pass one of its arrays, e.g. {path / names[0]}" if names else " with no arrays"
    raise ValueError(f"expected a zarr array at {path}, got a group{hint}")


def check_pixels(path: Path, array) -> None:
    dtype = np.dtype(getattr(array, "dtype", np.float64))
    if dtype.kind not in "biuf":
        raise ValueError(f"expected numeric pixels in {path.name}, got dtype {dtype}")


def check_image_size(shape: tuple[int, ...], image_hw: tuple[int, int], last_is_width: bool,
                     expected: str) -> None:
    """Refuse images smaller than :data:`MIN_IMAGE_SIDE` a side (a misread axis).

    Args:
        shape: the input's shape; image_hw: (H, W) of one image as it would be read;
        last_is_width: whether the input's last axis is read as the image width (not colour,
        not the stack axis); expected: the accepted shapes, in words.
    """
    if min(image_hw) >= MIN_IMAGE_SIDE:
        return
    message = (f"expected {expected} with images of at least {MIN_IMAGE_SIDE} x "
               f"{MIN_IMAGE_SIDE} pixels, got shape {tuple(shape)}, i.e. {image_hw[0]} x "
               f"{image_hw[1]} pixel images")
    if last_is_width and 2 <= shape[-1] <= 4:
        message += (f": its last axis ({shape[-1]}) looks like {shape[-1]} channels "
                    "(channel-last data); save one channel (e.g. data[..., 0])"
                    + (" or the image as RGB" if shape[-1] in (3, 4) else ""))
    raise ValueError(message)


# ---------------------------------------------------------------- outputs
def refuse_overlap(output: Path, what: str, others: dict[str, Path]) -> None:
    """Refuse an ``output`` that is, is inside, or contains one of ``others`` (the inputs),
    or lies inside a napari-sam embedding store: writing it would destroy them."""
    out = Path(output).expanduser().resolve()
    for label, other in others.items():
        theirs = Path(other).expanduser().resolve()
        same = out == theirs
        if not same and out.exists() and theirs.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, theirs)
        if same:
            raise ValueError(f"expected {what} other than the {label}, got {output} for both: "
                             f"refusing to overwrite the {label}")
        if theirs in out.parents:
            raise ValueError(f"expected {what} outside the {label} {other}, got {output} inside it")
        if out in theirs.parents:
            raise ValueError(f"expected {what} that does not contain the {label} {other}, got "
                             f"{output}")
    for parent in out.parents:
        if (parent / STORE_MARKER).is_file():
            raise ValueError(f"expected {what} outside embedding stores, got {output} inside "
                             f"the store {parent}")


def nearest_existing(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(target: Path, what: str, create: bool) -> None:
    """Check, before any work, that ``target`` can be written: its folder exists (or can be
    made, ``create=True`` makes it) and is writable. Raises ValueError."""
    target = Path(target).expanduser()
    folder = target.parent
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"expected {what} in a folder, got {target}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"expected {what} in a writable folder, got {target}: cannot write "
                         f"in {existing}")
    if not create:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # the real test (read-only mounts, ACLs…)
            pass
    except OSError as exc:
        raise ValueError(f"expected {what} in a writable folder, got {target}: "
                         f"{exc.strerror or exc}") from None


def write_atomic(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through ``write(file)`` into a temporary file of the same folder, then
    rename it over ``target``: a reader sees the old file or the whole new one, never half.
    On any failure (or Ctrl-C) the temporary is removed and an earlier ``target`` is intact."""
    target = Path(target)
    mode = _mode_for(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        os.close(fd)
        with open(tmp, "wb") as f:  # by name: writers such as tifffile want ``f.name``
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_for(target: Path) -> int:
    """An existing target's permissions, else the usual ones (0o666 less the umask)."""
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
