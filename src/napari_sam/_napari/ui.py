"""Small Qt helpers shared by the dock widgets."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFrame, QLineEdit, QScrollArea, QVBoxLayout, QWidget


def scrolled_body(owner: QWidget) -> tuple[QVBoxLayout, QVBoxLayout]:
    """Give ``owner`` a vertical scroll area: returns (body layout, footer layout). Controls
    go into the body, which scrolls when the dock is short (both widgets docked at napari's
    default window size); the footer (status line) stays visible below it."""
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # fit the dock's width
    inner = QWidget()
    area.setWidget(inner)
    outer.addWidget(area, 1)
    footer = QVBoxLayout()
    footer.setContentsMargins(9, 0, 9, 6)
    outer.addLayout(footer)
    return QVBoxLayout(inner), footer


def fit_narrow_docks(owner: QWidget) -> None:
    """Let ``owner``'s combo boxes and line edits shrink to the dock's width (the item text
    is elided) instead of clipping the controls on the right."""
    for combo in owner.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(8)
    for edit in owner.findChildren(QLineEdit):
        edit.setMinimumWidth(60)
    area = owner.findChild(QScrollArea)
    if area is not None:  # the dock is at least as wide as the controls need, scroll bar included
        need = area.widget().minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width()
        area.setMinimumWidth(need)


def with_tip(widget, text: str):
    """``widget`` with a tooltip (returns the widget, for building layouts inline)."""
    widget.setToolTip(text)
    return widget
