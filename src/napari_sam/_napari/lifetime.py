"""When a dock widget goes away, its jobs and hooks go with it.

napari closes a plugin dock widget (its x button, ``remove_dock_widget``, closing the
viewer) by taking the widget out of its dock (``setParent(None)``), not by deleting it: the
Python object may live on, with its key bindings, event connections and running workers.
:func:`on_close` runs a cleanup exactly once, at the first of: the widget leaves the dock it
was in, or its Qt object is destroyed.
"""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject


class _Once:
    """A plain callable (Qt may call it while the widget is being destroyed)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __call__(self, *_args) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class _CloseWatcher(QObject):
    """Event filter: the widget left the dock it had been put in."""

    def __init__(self, widget, once: _Once) -> None:
        super().__init__(widget)
        self._once = once
        self._was_docked = widget.parent() is not None
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange:
            if obj.parent() is not None:
                self._was_docked = True
            elif self._was_docked:
                self._once()
        return False


def on_close(widget, cleanup: Callable[[], None]) -> None:
    """Call ``cleanup()`` once when ``widget`` leaves its dock or is destroyed."""
    once = _Once(cleanup)
    widget._napari_sam_close_watcher = _CloseWatcher(widget, once)
    widget.destroyed.connect(once)
