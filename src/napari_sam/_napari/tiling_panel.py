"""The "Large images" controls shared by the dock widgets: tiling, tile size, halo, level.

Both widgets of a viewer show the same settings (they live in the viewer's
:class:`~napari_sam._napari.session.SamSession`: changing them in one widget changes them
in the other, and re-keys the cache so no tile of other settings is used again). The
"Level" row appears only for multiscale image layers.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QSpinBox,
)

from .levels import is_multiscale, level_shapes
from .tiles import TILINGS
from .ui import with_tip

TILING_TIPS = {
    "auto": "tile planes whose longest side is more than 1.5 model inputs (e.g. > 1536 px for "
            "SAM): each tile is encoded at full resolution, only where you work",
    "on": "tile every plane larger than one tile",
    "off": "encode each plane as one model input (a large image is shrunk to it: small "
           "objects may vanish)",
}


class TilingPanel(QGroupBox):
    """Tiling (auto / on / off), tile size, halo and, for multiscale layers, the level.

    Args:
        session: the viewer's session (settings are read from and written to it).
        on_stop: if given, a "Stop encoding" button calls it.
    """

    def __init__(self, session, on_stop=None, title: str = "Large images") -> None:
        super().__init__(title)
        self.session = session
        self._layer = None
        self._syncing = False
        form = QFormLayout(self)
        self._mode = QComboBox()
        for mode in TILINGS:
            self._mode.addItem(mode, mode)
        self._tile = QSpinBox()
        self._tile.setRange(0, 16384)
        self._tile.setSingleStep(256)
        self._tile.setSpecialValueText("model input")
        self._tile.setSuffix(" px")
        self._halo = QSpinBox()
        self._halo.setRange(-1, 4096)
        self._halo.setSingleStep(16)
        self._halo.setSpecialValueText("auto (1/8 tile)")
        self._halo.setSuffix(" px")
        self._level = QComboBox()
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        with_tip(self._mode, "; ".join(f"{m}: {t}" for m, t in TILING_TIPS.items()))
        for i, mode in enumerate(TILINGS):
            self._mode.setItemData(i, TILING_TIPS[mode], Qt.ItemDataRole.ToolTipRole)
        with_tip(self._tile, "tile side in image pixels; 'model input' (the default) encodes every tile "
                             "at full resolution")
        with_tip(self._halo, "context kept around each tile's own area (pixels per side): a click near "
                             "a tile's edge still sees its object's surroundings")
        with_tip(self._level, "which resolution level of this multiscale image is segmented (labels are "
                              "written at that level's geometry, exactly over the image)")
        form.addRow("Tiling", self._mode)
        form.addRow("Tile size", self._tile)
        form.addRow("Halo", self._halo)
        form.addRow("Level", self._level)
        self._level_label = form.labelForField(self._level)
        if on_stop is not None:
            self.stop_button = with_tip(QPushButton("Stop encoding"), "stop encoding the slice or its tiles "
                                                                     "(within a second); a new prompt starts again")
            self.stop_button.clicked.connect(on_stop)
            form.addRow(self.stop_button)
        form.addRow(self.status_label)
        for signal in (self._mode.currentIndexChanged, self._tile.valueChanged, self._halo.valueChanged):
            signal.connect(self._apply)
        self._level.activated.connect(self._choose_level)
        session.tiling_changed.connect(self.sync)
        self.sync()

    def close_panel(self) -> None:
        """Disconnect from the session (the owner widget is going away)."""
        self.session.tiling_changed.disconnect(self.sync)

    # ------------------------------------------------------------------ session -> fields
    def sync(self) -> None:
        """Show the session's settings (and the layer's levels)."""
        self._syncing = True
        try:
            tiling = self.session.tiling
            self._mode.setCurrentIndex(self._mode.findData(tiling.mode))
            self._tile.setValue(0 if tiling.tile_shape is None else tiling.tile_shape[0])
            self._halo.setValue(-1 if tiling.halo is None else tiling.halo[0])
            self._tile.setEnabled(tiling.mode != "off")
            self._halo.setEnabled(tiling.mode != "off")
            self._fill_levels()
        finally:
            self._syncing = False

    def set_layer(self, layer) -> None:
        """The image layer the owner works on (its levels fill "Level")."""
        self._layer = layer
        self.sync()

    def _fill_levels(self) -> None:
        layer = self._layer
        show = layer is not None and is_multiscale(layer)
        self._level.setVisible(show)
        if self._level_label is not None:
            self._level_label.setVisible(show)
        self._level.clear()
        if not show:
            return
        chosen = self.session.chosen_level(layer)
        current = self.session.level_for(layer)
        self._level.addItem(f"auto (level {current})" if chosen is None else "auto", None)
        for k, shape in enumerate(level_shapes(layer)):
            self._level.addItem(f"level {k}: {shape[-2]} x {shape[-1]} px", k)
        self._level.setCurrentIndex(0 if chosen is None else self._level.findData(chosen))

    # ------------------------------------------------------------------ fields -> session
    def _apply(self, *_args) -> None:
        if self._syncing:
            return
        tile = self._tile.value() or None
        halo = None if self._halo.value() < 0 else self._halo.value()
        try:
            self.session.set_tiling(self._mode.currentData(), tile, halo)
        except ValueError as exc:
            self.status_label.setText(f"not applied: {exc}")
            self.sync()

    def _choose_level(self, _index=None) -> None:
        if self._layer is not None and not self._syncing:
            self.session.set_level(self._layer, self._level.currentData())

    # ------------------------------------------------------------------ scripting
    def set_tiling(self, mode: str = "auto", tile_shape=None, halo=None) -> None:
        self.session.set_tiling(mode, tile_shape, halo)

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)


__all__ = ["TILING_TIPS", "TilingPanel"]
