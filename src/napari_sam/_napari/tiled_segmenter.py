"""The tiled part of :class:`~napari_sam._napari.segmenter.InteractiveSegmenter`.

When the shown plane is larger than the session's tiling threshold
(:meth:`SamSession.grid_for`), the plane is never encoded whole: the tiles under the
prompts are encoded first, then the tiles in view (:class:`.tile_encoding.TileEncoder`);
each prompt is decoded on the tile that owns it (:func:`.decode.decode_on_tiles`) as soon
as that tile is there, and the preview and commit touch only the objects' region.
"""

from __future__ import annotations

from ..engine.tiled_predictor import TiledPredictor
from .decode import decode_on_tiles, object_prompts, object_tile
from .tile_encoding import TileEncoder, tiles_in_view
from .tiles import MAX_CACHED_TILES, describe_plane


class TiledPlanes:
    """Mixin of the interactive segmenter: tiles of the shown plane.

    Attributes:
        tiles: the shown plane's :class:`~napari_sam._napari.tiles.TileSource`, or None
            when the plane is encoded in one piece.
        tile_encoder: the :class:`~napari_sam._napari.tile_encoding.TileEncoder`.
    """

    def _init_tiles(self) -> None:
        self.tiles = None
        self._seen = None  # (source, plane, grid) last synced
        self._prompt_tiles: list[int] = []
        self.tile_encoder = TileEncoder(self.encoder.runner, self.report, self._on_tile_ready)

    def _current_tiles(self):
        """The shown plane's TileSource (rebuilt when its keys changed: contrast, model,
        data, tiling), or None when it is not tiled."""
        tiles = None
        if self.image_layer is not None and self.plane is not None and self.session.has_model:
            source = self.source
            grid = self.session.grid_for(source, self.plane)
            if grid is not None:
                key = self.session.key_for(source, self.plane)
                tiles = self.tiles
                if tiles is None or tiles.grid != grid or tiles.plane_key != key:
                    tiles = self.session.tile_source(source, self.plane, grid)
        self.tiles = tiles
        self.tile_encoder.set_source(tiles)
        return tiles

    def _want_tiles(self, view: bool | None = None, resume: bool = False) -> None:
        """Steer the tile encoder: the prompts' tiles, then (with auto-encode, or ``view``)
        the tiles in view, nearest the view's centre first; ``resume`` after a Stop."""
        tiles = self.tiles
        if tiles is None:
            return
        in_view = []
        if self.auto_encode if view is None else view:
            limit = max(1, min(len(tiles), MAX_CACHED_TILES) - len(self._prompt_tiles))
            in_view = tiles_in_view(self.viewer, self.source, self.plane, tiles.grid, limit)
        self.tile_encoder.want(self._prompt_tiles, in_view, resume)

    def _request_tiles(self, wait: bool) -> bool:
        """Encode the tiles in view (and the prompts'); ``wait``: here, now."""
        self._want_tiles(view=True, resume=True)
        if wait:
            self.tile_encoder.runner.wait()
            self.tile_encoder.encode_now(self.tile_encoder.wanted())
            self.update_preview()
        self.changed.emit()
        return self.tile_encoder.pending == 0

    def _update_tiled(self, points_rc, point_labels, boxes_xyxy) -> None:
        """Decode the prompts on their tiles, or ask for those tiles first."""
        tiles, refine = self.tiles, self._refine_mask
        if self.refine_id is not None and len(points_rc) == 0 and len(boxes_xyxy) == 0:
            self.prediction = self._decode(points_rc, point_labels, boxes_xyxy)
            self._show(self.prediction)
            self.changed.emit()
            return
        objects = object_prompts(points_rc, point_labels, boxes_xyxy)
        needed = [object_tile(tiles.grid, self.plane, points_rc[g], point_labels[g], box, refine).index
                  for g, box in objects]
        self._prompt_tiles = list(dict.fromkeys(reversed(needed)))  # newest object first
        self._want_tiles(resume=True)
        missing = [k for k in self._prompt_tiles if tiles.cached(k) is None]
        if missing:
            rows, cols = tiles.grid.grid_shape
            where = ", ".join(f"({k // cols + 1}, {k % cols + 1})" for k in missing)
            self.prediction = None
            self._show(None)
            self.report(f"encoding tile {where} of {rows} x {cols} for your prompt… the mask follows")
            self.changed.emit()
            return
        tiled = TiledPredictor(self.session.predictor)
        tiled.set_tiles(tiles.grid, tiles.cached)
        self.prediction = decode_on_tiles(tiled, self.plane, points_rc, point_labels, boxes_xyxy, refine,
                                          self.multimask)
        self._show(self.prediction)
        self.changed.emit()

    def _on_tile_ready(self, k: int) -> None:
        if self.prediction is None and k in self._prompt_tiles:
            self.update_preview()  # its prompts were waiting for this tile
        self.changed.emit()
        self.session.embeddings_changed.emit()

    def _on_camera(self, event=None) -> None:
        if self.tiles is not None and self.auto_encode:
            self._want_tiles()

    def cancel_encoding(self) -> None:
        """Stop the background encoding (tiles: within an encoder block; they resume with
        the next prompt or :meth:`request_encoding`)."""
        if self.tiles is not None:
            self.tile_encoder.cancel()
        else:
            self.encoder.runner.cancel()

    def tiling_status(self) -> str:
        """E.g. "tiled: 7 x 4 tiles of 1024 px (3/28 encoded)", or how the plane is encoded."""
        return describe_plane(self.session, self.source, self.plane, self.tiles)


__all__ = ["TiledPlanes"]
