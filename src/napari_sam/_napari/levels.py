"""Multiscale image layers: work on one resolution level, place results exactly over it.

A multiscale layer's ``data`` is a list of levels, level 0 the full resolution. napari
draws pixel ``i`` of level ``k`` at level-0 data coordinate ``i * f`` (``f`` its
downsample factor, ``layer.downsample_factors[k]``, level-0 shape / level-k shape per
axis). :class:`LevelView` presents one level as a plain one-resolution layer — its own
``data``, a ``scale`` of ``layer.scale * f`` and the layer's translate, rotate, shear and
affine — so everything of the napari layer (planes, prompts, preview, the label writer,
new labels layers) works on that level unchanged and lands exactly where napari shows it.

Which level: the user chooses (the widgets' "Level"); by default the full resolution
(level 0) when the plane is tiled, else the coarsest level still at least one model input
wide (a one-encode model squeezes any plane to that size: reading more pixels gains
nothing).
"""

from __future__ import annotations

import numpy as np


def is_multiscale(layer) -> bool:
    return bool(getattr(layer, "multiscale", False))


def level_shapes(layer) -> list[tuple[int, ...]]:
    """The spatial (non-RGB) shape of every level (one entry for a plain layer)."""
    arrays = list(layer.data) if is_multiscale(layer) else [layer.data]
    rgb = bool(getattr(layer, "rgb", False))
    return [tuple(int(s) for s in (a.shape[:-1] if rgb else a.shape)) for a in arrays]


class LevelView:
    """Level ``level`` of a multiscale Image ``layer``, seen as a one-resolution layer.

    Attributes: ``layer`` (the napari layer), ``level``, ``data`` (that level's array,
    never read here), ``factors`` ((ndim,) level-0 pixels per level pixel), and what the
    napari-sam code reads from a layer: ``name``, ``ndim``, ``rgb``, ``multiscale`` (False),
    ``contrast_limits``, ``scale``, ``translate``, ``rotate``, ``shear``, ``affine``,
    ``data_to_world`` and ``world_to_data``.
    """

    multiscale = False

    def __init__(self, layer, level: int) -> None:
        shapes = level_shapes(layer)
        if not 0 <= int(level) < len(shapes):
            raise ValueError(f"expected a level in 0…{len(shapes) - 1} of '{layer.name}', got {level}")
        self.layer, self.level = layer, int(level)
        self.data = layer.data[self.level] if is_multiscale(layer) else layer.data
        self.factors = np.asarray(shapes[0], float) / np.asarray(shapes[self.level], float)

    def __eq__(self, other) -> bool:
        return isinstance(other, LevelView) and other.layer is self.layer and other.level == self.level

    def __hash__(self) -> int:
        return hash((id(self.layer), self.level))

    def __repr__(self) -> str:
        return f"LevelView('{self.layer.name}', level={self.level})"

    # what the rest of the napari-sam code reads from a layer
    name = property(lambda self: self.layer.name)
    ndim = property(lambda self: self.layer.ndim)
    rgb = property(lambda self: bool(getattr(self.layer, "rgb", False)))
    contrast_limits = property(lambda self: self.layer.contrast_limits)
    unique_id = property(lambda self: getattr(self.layer, "unique_id", None))
    events = property(lambda self: self.layer.events)
    scale = property(lambda self: np.asarray(self.layer.scale, float) * self.factors)
    translate = property(lambda self: self.layer.translate)
    rotate = property(lambda self: self.layer.rotate)
    shear = property(lambda self: self.layer.shear)
    affine = property(lambda self: self.layer.affine)

    def data_to_world(self, position) -> np.ndarray:
        """Level pixel coordinates (ndim,) -> world (as napari draws this level)."""
        return np.asarray(self.layer.data_to_world(np.asarray(position, float) * self.factors), float)

    def world_to_data(self, position) -> np.ndarray:
        """World -> level pixel coordinates (ndim,)."""
        return np.asarray(self.layer.world_to_data(position), float) / self.factors


def source_of(layer, level: int = 0):
    """What napari-sam segments of ``layer``: the layer itself (one resolution), or a
    :class:`LevelView` of its level ``level`` (multiscale)."""
    if layer is None or not is_multiscale(layer):
        return layer
    return LevelView(layer, level)


def layer_of(source):
    """The napari layer behind ``source`` (a layer or a :class:`LevelView`)."""
    return source.layer if isinstance(source, LevelView) else source


def default_level(layer, image_size: int, tiled: bool) -> int:
    """The level used unless the user picks one: 0 when tiling, else the coarsest level
    whose displayed plane (last two axes) is still at least ``image_size`` on its longest
    side (0 if none is)."""
    if tiled or not is_multiscale(layer):
        return 0
    shapes = level_shapes(layer)
    wide = [k for k, shape in enumerate(shapes) if max(shape[-2:]) >= image_size]
    return max(wide) if wide else 0


__all__ = ["LevelView", "default_level", "is_multiscale", "layer_of", "level_shapes", "source_of"]
