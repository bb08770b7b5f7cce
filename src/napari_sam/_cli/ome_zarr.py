"""OME-Zarr (NGFF 0.4 and 0.5) images in, OME-Zarr labels out, read and written lazily.

An OME-Zarr image is a zarr group whose ``multiscales`` metadata (``.zattrs`` in NGFF 0.4,
zarr format 2; ``zarr.json`` -> ``attributes.ome`` in NGFF 0.5, zarr format 3) lists its
resolution levels (``datasets``, full resolution first) and its ``axes`` (e.g. ``czyx``;
time first, then channel, then space). :func:`open_ome_zarr` picks one level and gives its
pixels as (H, W) or (N, H, W) without reading them: the channel axis is held at one
channel, axes of length 1 are dropped, one remaining non-image axis (z or t) is the stack.

Labels (:class:`OmeLabels`) go to ``IMAGE/labels/NAME``: a multiscale label image with one
level per image level (the spec asks for as many), each of the image level's shape (the
channel axis 1) and coordinate transformations, so they lie exactly over the image in
any OME-Zarr viewer. The segmented level is written as computed; the other levels are
resampled from it by nearest neighbour. Everything is written in a hidden folder beside the
target, then renamed; the image's own arrays are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import AxisView

LEGACY_AXES = ("t", "c", "z", "y", "x")  # NGFF 0.1-0.3: no axes metadata
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def group_attributes(path: Path) -> dict:
    """The group attributes at ``path`` (``.zattrs`` or ``zarr.json`` ``attributes``), {}
    when there are none or it is no group. Reads the JSON only (no zarr)."""
    path = Path(path)
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((path / "zarr.json").read_text())
        if meta.get("node_type") == "group":
            return dict(meta.get("attributes") or {})
        return {}
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((path / ".zattrs").read_text()))
    return {}


def ome_metadata(attributes: dict) -> dict:
    """The OME part of group attributes: ``attributes["ome"]`` (0.5) or the attributes (0.4)."""
    ome = attributes.get("ome")
    return dict(ome) if isinstance(ome, dict) else attributes


def is_ome_zarr(path: Path) -> bool:
    """Whether ``path`` is a zarr group with OME ``multiscales`` metadata (or a
    bioformats2raw collection of them)."""
    meta = ome_metadata(group_attributes(path))
    return "multiscales" in meta or "bioformats2raw.layout" in meta


def _axes(multiscale: dict, ndim: int) -> list[dict]:
    axes = multiscale.get("axes")
    if axes is None:
        axes = list(LEGACY_AXES[-ndim:])
    axes = [{"name": a} if isinstance(a, str) else dict(a) for a in axes]
    for axis in axes:
        if "type" not in axis:
            axis["type"] = {"t": "time", "c": "channel"}.get(axis["name"], "space")
    return axes


@dataclass(frozen=True)
class OmeImage:
    """One resolution level of an OME-Zarr image.

    Attributes:
        path: the image group; version: "0.4" | "0.5" (or older, read as 0.4);
        zarr_format: 2 | 3; multiscale: the group's first ``multiscales`` entry;
        level: index into ``multiscale["datasets"]`` (0 = full resolution);
        array: that level's zarr array, every axis; channel: the channel read (None: the
        image has no channel axis of length > 1).
    """

    path: Path
    version: str
    zarr_format: int
    multiscale: dict
    level: int
    array: object
    channel: int | None

    @property
    def axes(self) -> list[dict]:
        return _axes(self.multiscale, self.array.ndim)

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.axes]

    @property
    def datasets(self) -> list[dict]:
        return list(self.multiscale["datasets"])

    @property
    def yx(self) -> tuple[int, int]:
        """Axes of the image rows (y) and columns (x)."""
        names, space = self.names, [i for i, a in enumerate(self.axes) if a["type"] == "space"]
        if "y" in names and "x" in names:
            return names.index("y"), names.index("x")
        return space[-2], space[-1]

    @property
    def channel_axis(self) -> int | None:
        found = [i for i, a in enumerate(self.axes) if a["type"] == "channel"]
        return found[0] if found else None

    @property
    def stack_axis(self) -> int | None:
        """The one non-image, non-channel axis longer than 1 (z or t), or None (2D)."""
        others = [i for i in range(self.array.ndim) if i not in (*self.yx, self.channel_axis)
                  and self.array.shape[i] > 1]
        return others[0] if others else None

    def fixed_axes(self) -> dict[int, int]:
        """{axis: index} of the axes the pixels do not show: the channel, length-1 axes."""
        fixed = {i: 0 for i in range(self.array.ndim)
                 if i not in (*self.yx, self.stack_axis) and self.array.shape[i] == 1}
        if self.channel_axis is not None:
            fixed[self.channel_axis] = self.channel or 0
        return fixed

    def pixels(self) -> AxisView:
        """(H, W) or (N, H, W) lazy view of this level (N along :attr:`stack_axis`)."""
        return AxisView(self.array, self.fixed_axes())

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.array.shape)
        return (f"OME-Zarr {self.version} level {self.level} of {len(self.datasets)} "
                f"({''.join(self.names)} {shape})")


def open_ome_zarr(path: Path, level: int | None = None, channel: int | None = None) -> OmeImage:
    """The OME-Zarr image group at ``path`` at resolution ``level`` (default 0).

    Raises:
        ValueError: no/invalid multiscales metadata, a level or channel out of range, several
            channels without ``channel``, or more than one stack axis (e.g. t and z).
    """
    import zarr

    path = Path(path)
    meta = ome_metadata(group_attributes(path))
    if "multiscales" not in meta:
        images = sorted(p.name for p in path.iterdir() if p.is_dir() and is_ome_zarr(p))
        hint = f", e.g. {path / images[0]}" if images else ""
        raise ValueError(f"expected an OME-Zarr image group, got the collection {path}: pass "
                         f"one of its images{hint}")
    try:
        multiscale = dict(meta["multiscales"][0])
        paths = [str(d["path"]) for d in multiscale["datasets"]]
        group = zarr.open_group(str(path), mode="r")
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"expected NGFF multiscales metadata with datasets in {path}, got "
                         f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - unreadable metadata: one line
        raise ValueError(f"{path} is not a readable OME-Zarr group ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]})") from None
    level = 0 if level is None else int(level)
    if not 0 <= level < len(paths):
        raise ValueError(f"expected --level in [0, {len(paths) - 1}] ({len(paths)} resolution "
                         f"levels in {path.name}), got {level}")
    try:
        array = group[paths[level]]
    except KeyError:
        raise ValueError(f"expected the array {paths[level]} listed in {path}'s multiscales, "
                         "got nothing there") from None
    version = str(meta.get("version") or multiscale.get("version") or "0.4")
    image = OmeImage(path, version, int(group.metadata.zarr_format), multiscale, level, array, channel)
    axes = image.axes
    if len(axes) != array.ndim:
        raise ValueError(f"expected {array.ndim} axes in {path}'s multiscales (its arrays are "
                         f"{array.ndim}D), got {len(axes)}")
    _check_channel(image, channel)
    others = [image.names[i] + f"={array.shape[i]}" for i in range(array.ndim)
              if i not in (*image.yx, image.channel_axis) and array.shape[i] > 1]
    if len(others) > 1:
        raise ValueError(f"expected at most one of the non-image axes longer than 1 (a stack "
                         f"along z or t), got {', '.join(others)} in {path.name}")
    return image


def _check_channel(image: OmeImage, channel: int | None) -> None:
    axis = image.channel_axis
    n = 1 if axis is None else image.array.shape[axis]
    if channel is None and n > 1:
        raise ValueError(f"expected one channel, got {n} in {image.path.name} (axis "
                         f"{image.names[axis]}): pick one with --channel K (0..{n - 1})")
    if channel is not None and not 0 <= channel < n:
        raise ValueError(f"expected --channel in [0, {n - 1}], got {channel}")


# ---------------------------------------------------------------- labels
def check_label_name(name: str) -> None:
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"expected a label name of letters, digits, '.', '_' or '-' (not "
                         f"starting with '.' or '-'), got {name!r}")


def _write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file beside it, then renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _nearest(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each of ``n_out`` pixels resampling an axis of ``n_in`` pixels."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


class OmeLabels:
    """``IMAGE/labels/NAME`` of an :class:`OmeImage`, written safely.

    ``check()`` (before any work) refuses an existing label of that name unless
    ``overwrite``; ``open(shape, chunks_hw)`` returns the (N, H, W) / (H, W) uint32 view to fill
    (the segmented level, in a hidden folder beside the target); ``commit()`` adds the other
    levels and the metadata, renames it into place and lists it in ``labels``;
    ``abort()`` removes what was written. ``extra`` goes into the label group's attributes
    (under "napari-sam").
    """

    def __init__(self, image: OmeImage, name: str, overwrite: bool = False, extra: dict | None = None):
        self.image, self.name, self.overwrite, self.extra = image, name, overwrite, extra or {}
        self.folder = image.path / "labels"
        self.target = self.folder / name
        self.tmp: Path | None = None
        self._made_folder = False

    def check(self) -> None:
        check_label_name(self.name)
        if self.target.exists() and not self.overwrite:
            raise ValueError(f"expected a new label name, got {self.name!r}: {self.target} exists "
                             "(pass --overwrite to replace it, or choose another --ome-labels NAME)")
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(f"expected a label group at {self.target}, got a file")
        where = self.folder if self.folder.is_dir() else self.image.path
        if not os.access(where, os.W_OK | os.X_OK):
            raise ValueError(f"expected a writable OME-Zarr image for its labels, got {where} "
                             "read-only")

    def open(self, shape: tuple[int, ...], chunks_hw: tuple[int, int]) -> AxisView:
        """The (N, H, W) / (H, W) uint32 view to fill; ``shape`` must be the pixels' shape."""
        import zarr

        if tuple(shape) != tuple(self.image.pixels().shape):
            raise ValueError(f"expected labels of the image's shape {self.image.pixels().shape}, "
                             f"got {tuple(shape)}")

        if not self.folder.exists():
            self.folder.mkdir()
            self._made_folder = True
        self.tmp = self.folder / f".{self.name}.{uuid.uuid4().hex[:8]}.part"
        self._group = zarr.open_group(str(self.tmp), mode="w-", zarr_format=self.image.zarr_format)
        self._chunks_hw = tuple(int(c) for c in chunks_hw)
        self._levels = [self._create(k) for k in range(len(self.image.datasets))]
        fixed = {axis: 0 for axis in self.image.fixed_axes()}  # the labels' channel axis is 1 long
        return AxisView(self._levels[self.image.level], fixed)

    def _shape(self, level: int) -> tuple[int, ...]:
        import zarr

        shape = list(zarr.open_group(str(self.image.path), mode="r")[self.image.datasets[level]["path"]].shape)
        if self.image.channel_axis is not None:
            shape[self.image.channel_axis] = 1
        return tuple(shape)

    def _create(self, level: int):
        shape = self._shape(level)
        (y, x), chunks = self.image.yx, [1] * len(shape)
        chunks[y], chunks[x] = min(shape[y], self._chunks_hw[0]), min(shape[x], self._chunks_hw[1])
        kwargs = {"dimension_names": self.image.names} if self.image.zarr_format == 3 else {}
        return self._group.create_array(str(self.image.datasets[level]["path"]), shape=shape,
                                        chunks=tuple(chunks), dtype="uint32", fill_value=0, **kwargs)

    def _resample(self, level: int) -> None:
        """Level ``level`` from the segmented one, nearest neighbour, one row block at a time."""
        source, target = self._levels[self.image.level], self._levels[level]
        axes = range(len(target.shape))
        index = [_nearest(target.shape[a], source.shape[a]) for a in axes]
        (y, x), block = self.image.yx, self._chunks_hw[0]
        outer = [a for a in axes if a not in (y, x)]
        for plane in np.ndindex(*(target.shape[a] for a in outer)):
            key_out, key_in = [slice(None)] * len(axes), [slice(None)] * len(axes)
            for a, i in zip(outer, plane):
                key_out[a], key_in[a] = i, int(index[a][i])
            for r0 in range(0, target.shape[y], block):
                rows = index[y][r0:r0 + block]
                key_in[y] = slice(int(rows[0]), int(rows[-1]) + 1)
                key_out[y] = slice(r0, r0 + len(rows))
                pixels = np.asarray(source[tuple(key_in)])  # 2D: y and x in the array's order
                if y > x:
                    pixels = pixels.T  # (rows', W')
                picked = pixels[rows - rows[0]][:, index[x]]  # (rows, W) of this level
                target[tuple(key_out)] = picked if y < x else picked.T

    def commit(self, max_label: int = 0) -> None:
        for level in range(len(self._levels)):
            if level != self.image.level:
                self._resample(level)
        self._group.attrs.update(self._attributes())
        replaced = None
        if self.target.exists():
            replaced = self.folder / f".{self.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(self.target, replaced)
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            if replaced is not None:
                os.replace(replaced, self.target)
            raise
        self.tmp = None
        self._list_label()
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if still empty: it is ours

    def _attributes(self) -> dict:
        image, datasets = self.image, []
        for d in image.datasets:
            datasets.append({"path": str(d["path"]),
                             "coordinateTransformations": list(d.get("coordinateTransformations")
                                                               or [{"type": "scale",
                                                                    "scale": [1.0] * image.array.ndim}])})
        multiscale = {"name": self.name, "axes": image.axes, "datasets": datasets}
        if image.multiscale.get("coordinateTransformations"):
            multiscale["coordinateTransformations"] = image.multiscale["coordinateTransformations"]
        label = {"source": {"image": "../../"}}
        if image.zarr_format == 2:
            multiscale["version"] = label["version"] = image.version
            ome = {"multiscales": [multiscale], "image-label": label}
        else:
            ome = {"ome": {"version": image.version, "multiscales": [multiscale], "image-label": label}}
        return {**ome, "napari-sam": {"level": image.level, **self.extra}}

    def _list_label(self) -> None:
        """Add NAME to the ``labels`` list of IMAGE/labels (made a group if it is none)."""
        if self.image.zarr_format == 2:
            if not (self.folder / ".zgroup").exists():
                _write_json(self.folder / ".zgroup", {"zarr_format": 2})
            attrs = group_attributes(self.folder)
            names = list(attrs.get("labels") or [])
            if self.name not in names:
                _write_json(self.folder / ".zattrs", {**attrs, "labels": [*names, self.name]})
            return
        path = self.folder / "zarr.json"
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {}}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(path.read_text())
        ome = dict(meta.setdefault("attributes", {}).get("ome") or {"version": self.image.version})
        names = list(ome.get("labels") or [])
        if self.name not in names:
            ome["labels"] = [*names, self.name]
            meta["attributes"]["ome"] = ome
            _write_json(path, meta)
