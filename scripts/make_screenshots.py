"""The README's screenshots, from the real widgets docked in napari (run under Xvfb):

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py

writes docs/images/{interactive,boxes,propagation,everything,everything_ais,tiled}.png. No weights needed: the
model is the oracle of the tests (tests/oracle.py) — the real engine, predictor, caches,
widgets and label writer, with a "model" whose decoder returns the object under each
prompt. Here its encoder finds the objects by classical segmentation of what it is shown
(background subtraction, Otsu threshold, hole filling, watershed split, convex
hulls), so the masks look like what SAM
gives on such images; they are *not* SAM's output. Each workflow runs the way a user drives
it (scripted through the widgets' methods: clicks and boxes in the prompt layers, commit,
propagate, segment everything), then the whole window is captured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the oracle models of the tests

WINDOW = (1280, 860)  # width, height of napari's window
MAX_BYTES = 250_000   # each PNG at most this (colours quantised, then downscaled if needed)


def segmenting_oracle(image_size: int = 1024):
    """The tests' oracle (FastOracle: memoised grid decodes) with an encoder that labels
    the objects of the image it is shown, each with its own flat intensity."""
    import torch
    from scipy import ndimage
    from skimage import filters, measure, morphology, segmentation
    from test_automatic_oracle import FastOracle

    class SegmentingOracle(FastOracle):
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            self.encode_calls += 1
            gray = x[:, 0].float().cpu().numpy()  # (B, S, S); padding -1
            maps = np.stack([self._objects(g) for g in gray])
            g = self.image_size // 16
            return torch.from_numpy(maps).reshape(x.shape[0], self.embed_dim, g, g)

        def _objects(self, gray: np.ndarray) -> np.ndarray:
            """(S, S) float: 0 background, -1 padding, one flat intensity per object."""
            f = self.image_size / 1024  # sizes below are for a 1024 model input
            valid = gray >= 0
            rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
            crop = gray[: rows[-1] + 1, : cols[-1] + 1]
            smooth = filters.gaussian(crop, sigma=3 * f, preserve_range=True)
            # uneven illumination: subtract a smooth background (grey opening, coarse)
            n = max(3, round(41 * f)) | 1
            background = ndimage.grey_opening(smooth[::4, ::4], size=(n, n))
            background = filters.gaussian(background, 4 * f, preserve_range=True)
            background = ndimage.zoom(background, 4, order=1)[: crop.shape[0], : crop.shape[1]]
            background = np.pad(background, [(0, crop.shape[0] - background.shape[0]),
                                             (0, crop.shape[1] - background.shape[1])], mode="edge")
            contrast = smooth - background
            mask = contrast > 0.7 * filters.threshold_otsu(contrast)
            mask = ndimage.binary_closing(mask, morphology.disk(max(1, round(7 * f))))
            mask = ndimage.binary_opening(mask, morphology.disk(max(1, round(5 * f))))
            mask = morphology.remove_small_objects(ndimage.binary_fill_holes(mask),
                                                   max_size=round(400 * f * f))
            distance = ndimage.distance_transform_edt(mask)  # touching objects: watershed
            peaks = morphology.h_maxima(filters.gaussian(distance, 4 * f, preserve_range=True), 6 * f)
            labels = segmentation.watershed(-distance, measure.label(peaks), mask=mask)
            out = np.full(gray.shape, -1.0, np.float32)
            objects = out[: crop.shape[0], : crop.shape[1]]
            objects[:] = 0.0
            for k, region in enumerate(measure.regionprops(labels)):  # convex, as SAM's masks
                r0, c0, r1, c1 = region.bbox
                window = objects[r0:r1, c0:c1]
                window[region.image_convex & (window == 0)] = 20 + 11 * (k % 21)
            return out

        def decode(self, features, points_xy=None, point_labels=None, boxes_xyxy=None,
                   mask_input=None, multimask_output=True, cache=None):
            """As the oracle; a lone positive point on the background (most of a
            segment-everything grid) answers "nothing" at once."""
            if boxes_xyxy is not None or mask_input is not None or points_xy is None or (
                    points_xy.shape[1] != 1 or (point_labels != 1).any()):
                return super().decode(features, points_xy, point_labels, boxes_xyxy,
                                      mask_input, multimask_output, cache)
            img = self._image(features)
            s = self.image_size
            k = 3 if multimask_output else 1
            empty = torch.full((1, k, s // 4, s // 4), -10.0)
            iou = torch.tensor([[0.5, 0.9, 0.6]] if multimask_output else [[0.9]])
            low, ious = [], []
            for b in range(points_xy.shape[0]):
                x, y = points_xy[b, 0].tolist()
                r, c = (int(np.clip(np.floor(v), 0, s - 1)) for v in (y, x))
                if img[r, c] <= 2.5:
                    low.append(empty), ious.append(iou)
                else:
                    out = super().decode(features, points_xy[b : b + 1], point_labels[b : b + 1],
                                         None, None, multimask_output, cache)
                    low.append(out[0]), ious.append(out[1])
            return torch.cat(low), torch.cat(ious)

        @staticmethod
        def _region_at(img, x, y):
            """A click on the background selects nothing (SAM's grid points there give
            no confident mask either)."""
            s = img.shape[0]
            r, c = int(np.clip(np.floor(y), 0, s - 1)), int(np.clip(np.floor(x), 0, s - 1))
            if img[r, c] <= 2.5:
                return np.zeros_like(img, dtype=bool)
            return FastOracle._region_at(img, x, y)

    model = SegmentingOracle(image_size)
    model.model_type = "oracle (tests/oracle.py)"
    return model


def nuclei_stack(n: int = 24, size: int = 256, seed: int = 3) -> np.ndarray:
    """(n, size, size) uint16: ellipsoidal nuclei with texture and noise, a confocal-like
    stack (bright, blurred, varying brightness), each nucleus spanning several slices."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :size, :size].astype(np.float32)
    volume = np.zeros((n, size, size), np.float32)
    centres = []
    for _ in range(2000):  # up to 16 nuclei, apart in (y, x) unless apart in z
        c = np.array([rng.uniform(4, n - 5), rng.uniform(30, size - 30), rng.uniform(30, size - 30)])
        if all(np.hypot(*(c[1:] - d[1:])) > 50 or abs(c[0] - d[0]) > 14 for d in centres):
            centres.append(c)
        if len(centres) == 16:
            break
    for cz, cy, cx in centres:
        rz, ry, rx = rng.uniform(5, 8), rng.uniform(18, 26), rng.uniform(18, 26)
        inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        volume[inside] = rng.uniform(0.6, 1.0)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, volume.shape), 2)
    volume = ndimage.gaussian_filter(volume * (1 + 0.6 * texture), (0.8, 1.5, 1.5))
    volume += rng.normal(0.05, 0.02, volume.shape)
    return (volume.clip(0, None) * 3000).astype(np.uint16)


def settle(frames: int = 30) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(frames):
        QApplication.processEvents()


def save(viewer, path: Path) -> None:
    """Whole window -> PNG <= MAX_BYTES (palette of 256 colours; downscaled if needed)."""
    from PIL import Image

    settle()
    pixels = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(pixels[..., :3])
    scale = 1.0
    while True:
        shown = image if scale == 1.0 else image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        shown.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
        if path.stat().st_size <= MAX_BYTES or scale < 0.5:
            break
        scale *= 0.9
    print(f"{path}: {shown.width}x{shown.height}, {path.stat().st_size // 1024} KiB")


def new_viewer():
    import napari

    viewer = napari.Viewer(show=True)
    viewer.window.resize(*WINDOW)
    return viewer


def dock(viewer, name: str, tabify: bool = False):
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", name, tabify=tabify)
    return widget


def coins_encoded():
    """(viewer, Segment Anything widget) on scikit-image's coins, the slice encoded."""
    from skimage import data

    viewer = new_viewer()
    coins = viewer.add_image(data.coins(), name="coins")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(segmenting_oracle())
    widget.set_image_layer(coins)
    widget.encode_current_slice(wait=True)
    return viewer, widget


def interactive(out: Path) -> None:
    """Clicks -> live preview: one coin committed (label 1), the next one clicked (preview)."""
    viewer, widget = coins_encoded()
    widget.add_point((125, 45))
    widget.commit()
    widget.add_point((126, 102))  # a positive click: the preview shows the coin
    viewer.layers.selection.active = viewer.layers["SAM points"]
    settle()
    viewer.reset_view()
    save(viewer, out / "interactive.png")
    viewer.close()


def boxes(out: Path) -> None:
    """Several boxes -> several objects at once (preview, before the commit)."""
    viewer, widget = coins_encoded()
    for r0, c0, r1, c1 in ((174, 21, 220, 67), (171, 76, 221, 128), (175, 131, 221, 178),
                           (166, 185, 220, 241)):  # around four coins of the third row
        widget.add_box((r0, c0), (r1, c1))
    viewer.layers.selection.active = viewer.layers["SAM boxes"]
    settle()
    viewer.reset_view()
    save(viewer, out / "boxes.png")
    viewer.close()


def propagation(out: Path) -> None:
    """One click on a nucleus in slice 12, Propagate through stack: one 3D label."""
    model = segmenting_oracle(512)  # the stack is 256 x 256: a smaller input loses nothing
    viewer = new_viewer()
    stack = nuclei_stack()
    layer = viewer.add_image(stack, name="nuclei", colormap="gray")
    widget = dock(viewer, "Segment Anything")
    widget.set_model(model)
    widget.set_image_layer(layer)
    middle = 12
    viewer.dims.set_current_step(0, middle)
    widget.encode_current_slice(wait=True)
    # the brightest nucleus on this slice
    from scipy import ndimage

    objects, n = ndimage.label(ndimage.gaussian_filter(stack[middle].astype(float), 2) > 900)
    sizes = ndimage.sum(np.ones_like(objects), objects, range(1, n + 1))
    r, c = ndimage.center_of_mass(objects == 1 + int(np.argmax(sizes)))
    widget.add_point((middle, r, c))
    widget.propagate(wait=True)
    viewer.dims.set_current_step(0, middle + 3)  # another slice: the object followed
    settle()
    viewer.reset_view()
    save(viewer, out / "propagation.png")
    viewer.close()


def everything(out: Path) -> None:
    """Segment everything on the coins, both widgets docked."""
    from skimage import data

    model = segmenting_oracle()
    viewer = new_viewer()
    coins = viewer.add_image(data.coins(), name="coins")
    # the model is loaded in the Segment Anything widget; both widgets share it. The
    # second dock is tabbed with the first (as when dragged onto it), so it gets the height
    interactive_widget = dock(viewer, "Segment Anything")
    interactive_widget.set_model(model)
    widget = dock(viewer, "Segment Everything", tabify=True)
    widget.set_image_layer(coins)
    widget.run(scope="slice", wait=True)
    settle()
    viewer.reset_view()
    save(viewer, out / "everything.png")
    viewer.close()


def everything_ais(out: Path) -> None:
    """Segment Everything in AIS mode (a model with an instance decoder) on the nuclei
    stack's middle slice: the mode, its parameters and the objects written."""
    from oracle import with_instance_decoder

    model = with_instance_decoder(segmenting_oracle(512))
    model.model_type = "oracle (tests/oracle.py)"
    viewer = new_viewer()
    layer = viewer.add_image(nuclei_stack(), name="nuclei", colormap="gray")
    viewer.dims.set_current_step(0, 12)
    dock(viewer, "Segment Anything").set_model(model)
    widget = dock(viewer, "Segment Everything", tabify=True)
    widget.set_image_layer(layer)
    widget.run(scope="slice", wait=True)
    settle()
    viewer.reset_view()
    save(viewer, out / "everything_ais.png")
    viewer.close()


def cell_mosaic(shape=(5000, 3000), seed: int = 7) -> np.ndarray:
    """(H, W) uint16: a large field of small, textured, unevenly bright cells (a
    whole-slide-like mosaic, far larger than one model input)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = shape
    field = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[-40:41, -40:41]
    for _ in range(6000):
        r, c = rng.integers(45, h - 45), rng.integers(45, w - 45)
        a, b, t = rng.uniform(12, 30), rng.uniform(10, 22), rng.uniform(0, np.pi)
        u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
        cell = (u / a) ** 2 + (v / b) ** 2 <= 1
        window = field[r - 40 : r + 41, c - 40 : c + 41]
        if (window[(u / (a + 6)) ** 2 + (v / (b + 6)) ** 2 <= 1] > 0).any():  # keep cells apart
            continue
        window[cell] = rng.uniform(0.5, 1.0)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (h // 4, w // 4)).astype(np.float32), 1)
    field *= 1 + 0.4 * ndimage.zoom(texture, 4, order=1)[:h, :w]
    field = ndimage.gaussian_filter(field, 1.5)
    shade = np.linspace(0.7, 1.0, w, dtype=np.float32)[None, :]  # uneven illumination
    field = field * shade + 0.05 + rng.normal(0, 0.015, (h, w)).astype(np.float32)
    return (field.clip(0, None) * 3000).astype(np.uint16)


def tiled(out: Path) -> None:
    """A 5000 x 3000 mosaic, tiled: clicks in two tiles (one object on a tile border)
    committed, a third previewed; the "Large images" panel says how many of the tiles are
    encoded — only those under the clicks (and in view)."""
    from napari_sam.engine.tiling import TileGrid

    model = segmenting_oracle(1024)
    viewer = new_viewer()
    image = cell_mosaic()
    layer = viewer.add_image(image, name="mosaic (5000 x 3000)", colormap="gray")
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False  # only the clicked tiles: the panel shows it
    widget.set_model(model)
    widget.set_image_layer(layer)
    grid = TileGrid(image.shape, 1024, 128)
    border = grid.tiles[5].inner_rc[1]  # the interior border under tile 1 of column 1
    from scipy import ndimage

    objects, _ = ndimage.label(ndimage.gaussian_filter(image.astype(float), 2) > 1200)
    centres = ndimage.center_of_mass(objects > 0, objects, range(1, objects.max() + 1))
    near = sorted(centres, key=lambda rc: abs(rc[0] - border) + abs(rc[1] - 1500) / 4)
    picks = [near[0], near[3], near[6]]
    for n, (r, c) in enumerate(picks):
        widget.add_point((r, c))
        widget.segmenter.tile_encoder.runner.wait(60)
        settle()
        if n < 2:
            widget.commit()
    viewer.layers.selection.active = viewer.layers["SAM points"]
    viewer.camera.center = tuple(np.mean(picks, axis=0))
    viewer.camera.zoom = 1.0
    save(viewer, out / "tiled.png")
    viewer.close()


WORKFLOWS = {"interactive": interactive, "boxes": boxes, "propagation": propagation,
             "everything": everything, "everything_ais": everything_ais, "tiled": tiled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("only", nargs="*", help=f"some of {', '.join(WORKFLOWS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(WORKFLOWS)
    if unknown:
        parser.error(f"expected workflows in {list(WORKFLOWS)}, got {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or WORKFLOWS:
        WORKFLOWS[name](args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
