"""napari integration of napari-sam: the only code importing napari, Qt or magicgui.

* :class:`SamSession` / :func:`session_for` — one model, predictor and embedding cache
  per viewer, shared by every napari-sam widget (see :mod:`.session`).
* :class:`SliceEmbeddings` — a stack axis of an image layer as ``embeddings`` for
  :func:`napari_sam.engine.volume.propagate`, through the session's cache.
* :class:`SegmentAnythingWidget` — the interactive dock widget (imported lazily: Qt).
* :mod:`.geometry` — planes, world <-> data, (row, col) <-> (x, y).
"""

from .session import SamSession, SliceEmbeddings, session_for

__all__ = ["SamSession", "SegmentAnythingWidget", "SliceEmbeddings", "session_for"]


def __getattr__(name: str):
    if name == "SegmentAnythingWidget":
        from .widget import SegmentAnythingWidget

        return SegmentAnythingWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
