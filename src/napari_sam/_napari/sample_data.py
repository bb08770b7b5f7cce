"""Sample data for napari-sam: real images, each with objects SAM can separate.

The 2D images ship with scikit-image (no download). The 3D stack is scikit-image's
``cells3d`` (fluorescence confocal stack of cells, nuclei channel), which scikit-image
downloads once (~32 MB) into its cache.
"""

from __future__ import annotations


def coins():
    """Greek coins (303 x 384, uint8): many separate objects on a background."""
    from skimage import data

    return [(data.coins(), {"name": "coins"}, "image")]


def cell():
    """A cell imaged by phase contrast microscopy (660 x 550, uint8)."""
    from skimage import data

    return [(data.cell(), {"name": "cell"}, "image")]


def immunohistochemistry():
    """Immunohistochemistry tissue section, RGB (512 x 512 x 3, uint8)."""
    from skimage import data

    return [(data.immunohistochemistry(), {"name": "ihc", "rgb": True}, "image")]


def nuclei_3d():
    """Nuclei of a 3D confocal stack (60 x 256 x 256, uint16; voxel 0.29 x 0.26 x 0.26 µm).

    Downloaded once by scikit-image; raises a clear error when offline.
    """
    from skimage import data

    try:
        stack = data.cells3d()  # (Z, C, Y, X): membranes, nuclei
    except Exception as exc:  # noqa: BLE001 - pooch raises many network error types
        raise RuntimeError(
            "the 3D sample (scikit-image 'cells3d') must be downloaded once and the "
            f"download failed: {exc}"
        ) from exc
    meta = {"name": "nuclei 3D", "scale": (0.29, 0.26, 0.26), "units": "um"}
    return [(stack[:, 1], meta, "image")]
