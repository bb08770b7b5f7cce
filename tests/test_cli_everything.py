"""``napari-sam everything``: 2D and 3D label images from the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

import napari_sam.engine
from conftest import patch_build_sam
from napari_sam.cli import main
from test_automatic_oracle import FastOracle, draw_objects, iou

FLAGS = ["--points-per-side", "16", "--stability-score-thresh", "0.8", "--quiet"]


@pytest.fixture
def oracle(monkeypatch):
    """``build_sam`` returns the oracle model (no weights, no download)."""
    model = FastOracle(256)
    return patch_build_sam(monkeypatch, model)


def test_png_2d_and_rgb(tmp_path, oracle, capsys):
    image, truth = draw_objects((220, 256), grid=(3, 3), seed=3, radius=(12, 32))
    Image.fromarray(np.repeat(image[..., None], 3, axis=-1)).save(tmp_path / "in.png")
    out = tmp_path / "out" / "labels.tif"
    args = ["everything", str(tmp_path / "in.png"), "-o", str(out), "--model", "vit_t",
            "--checkpoint", "w.pt", "--device", "cpu", *FLAGS]
    assert main(args) == 0
    assert oracle.build_calls == [("vit_t", "w.pt", "cpu", "auto")]
    labels = tifffile.imread(out)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    for t in truth:
        values, counts = np.unique(labels[t], return_counts=True)
        assert values[np.argmax(counts)] > 0 and iou(labels == values[np.argmax(counts)], t) >= 0.9
    assert "objects in" in capsys.readouterr().err


def test_tif_stack_one_id_per_object(tmp_path, oracle):
    z, y, x = np.mgrid[0:4, 0:100, 0:128]
    ball = (z - 1.5) ** 2 * 50 + (y - 50) ** 2 + (x - 40) ** 2 < 30**2
    rod = ((y - 50) ** 2 + (x - 100) ** 2 < 15**2)
    stack = (ball * 3000 + rod * 9000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    assert main(["everything", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "l.tif"), *FLAGS]) == 0
    labels = tifffile.imread(tmp_path / "l.tif")
    assert labels.shape == stack.shape
    for obj in (ball, rod):
        values, counts = np.unique(labels[obj], return_counts=True)
        assert counts.max() >= 0.9 * obj.sum() and values[np.argmax(counts)] > 0
    assert labels[ball].max() != labels[rod].max()


def test_bad_input_exit_codes(tmp_path, oracle, capsys):
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 2, 8, 8, 5), np.uint8))
    cases = [
        (["everything", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "o.tif")], "not found"),
        (["everything", str(tmp_path / "4d.tif"), "-o", str(tmp_path / "o.tif")], "expected (H, W)"),
        (["everything", str(tmp_path / "4d.tif"), "-o", str(tmp_path / "o.png")], "expected an output"),
        (["everything", str(tmp_path / "4d.tif"), "-o", str(tmp_path / "o.tif"), "--rgb", "yes"], "--rgb yes"),
    ]
    np.save(tmp_path / "img.npy", np.zeros((30, 40), np.float32))
    cases.append((["everything", str(tmp_path / "img.npy"), "-o", str(tmp_path / "o.tif"),
                   "--points-per-batch", "0"], "expected points_per_batch >= 1"))
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "napari-sam everything: error:" in err and message in err


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((30, 40), np.uint8))
    run = subprocess.run(
        [sys.executable, "-m", "napari_sam.cli", "everything", str(tmp_path / "img.tif"), "-o",
         str(tmp_path / "o.tif"), "--model", "vit_t", "--checkpoint", str(tmp_path / "nope.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2 and "nope.pt" in run.stderr and "Traceback" not in run.stderr
