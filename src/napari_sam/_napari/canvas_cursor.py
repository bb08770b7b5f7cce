"""Where the cursor really rests on napari's canvas (:class:`CanvasCursor`).

vispy hands a mouse move to napari only if 10 ms have passed since the last one it handed
on, and never hands a dropped one on later. After the last move of a fast mouse (125 Hz
and up), napari's mouse-move callbacks may so believe the cursor is a pixel or two from
where it came to rest, and a decode ahead for that spot would not match the click. An event
filter on the canvas widget sees every move; :meth:`CanvasCursor.resend_if_dropped` sends
the last one again, now past vispy's 10 ms, so napari (and its callbacks) get the exact
position the press will have.
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QPointF, Qt
from qtpy.QtGui import QMouseEvent
from qtpy.QtWidgets import QApplication, QOpenGLWidget, QWidget


class CanvasCursor(QObject):
    """The last button-less mouse move on ``canvas`` (napari's canvas widget)."""

    def __init__(self, canvas: QWidget) -> None:
        super().__init__(canvas)  # lives and dies with the canvas
        self.canvas = canvas
        self.last: QPointF | None = None
        canvas.installEventFilter(self)

    @classmethod
    def find(cls, window: QWidget | None) -> CanvasCursor | None:
        """The cursor of the canvas in ``window`` (napari's main window: its one OpenGL
        widget), or None if there is not exactly one."""
        canvases = [] if window is None else window.findChildren(QOpenGLWidget)
        return cls(canvases[0]) if len(canvases) == 1 else None

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.MouseMove and event.buttons() == Qt.MouseButton.NoButton:
            self.last = QPointF(event.position())
        elif event.type() == QEvent.Type.Leave:
            self.last = None
        return False  # never consumed: napari handles it as always

    def resend_if_dropped(self, seen_xy) -> bool:
        """If the last move was not at ``seen_xy`` (canvas (x, y) px of the last move napari
        handled), send it again; returns True when sent (napari handled it meanwhile)."""
        last = self.last
        if last is None or seen_xy is None or (round(last.x()), round(last.y())) == tuple(seen_xy):
            return False
        none = Qt.MouseButton.NoButton
        move = QMouseEvent(QEvent.Type.MouseMove, last, QPointF(self.canvas.mapToGlobal(last.toPoint())),
                           none, none, Qt.KeyboardModifier.NoModifier)
        QApplication.sendEvent(self.canvas, move)
        return True
