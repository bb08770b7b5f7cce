"""``napari-sam everything``: 2D and 3D label images from the command line."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_cli_embed import napari_sam, vit_t_args  # noqa: F401 - fixture

from conftest import patch_build_sam
from napari_sam._cli.files import write_atomic
from napari_sam.cli import main
from napari_sam.engine.store import EmbeddingStore
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
                   "--points-per-batch", "0"], "expected points_per_batch"))
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


def one_line_error(run) -> str:
    line, = run.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("napari-sam everything: error:"), run.stderr
    return line


def inputs_and_output(tmp_path, case):
    """(input, output, cwd) of an output that would destroy an input."""
    data = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    source = tmp_path / "same.tif"
    tifffile.imwrite(source, data)
    output, cwd = source, None
    if case == "relative":
        output, cwd = "./sub/../same.tif", tmp_path
        (tmp_path / "sub").mkdir()
    elif case == "hard-link":
        output = tmp_path / "link.tif"
        os.link(source, output)
    elif case == "inside-zarr":
        import zarr

        source = tmp_path / "in.zarr"
        zarr.open_array(str(source), mode="w", shape=(64, 64), dtype="uint16")[:] = data
        output = source / "labels.tif"
    elif case == "inside-store":
        EmbeddingStore.open(tmp_path / "s.zarr", np.stack([data] * 2), FastOracle(256))
        output = tmp_path / "s.zarr" / "labels.tif"
    return source, output, cwd


def files_of(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["same", "hard-link"])
def test_the_installed_command_never_replaces_its_input(tmp_path, vit_t_args, case):
    source, output, cwd = inputs_and_output(tmp_path, case)
    before = files_of(tmp_path)
    run = napari_sam("everything", source, "-o", output, *vit_t_args, "--quiet", cwd=cwd)
    assert run.returncode == 2 and "refusing to overwrite the input" in one_line_error(run)
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("case", ["relative", "inside-zarr", "inside-store"])
def test_the_output_is_never_an_input_nor_inside_one(tmp_path, oracle, capsys, monkeypatch, case):
    source, output, cwd = inputs_and_output(tmp_path, case)
    before = files_of(tmp_path)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    assert main(["everything", str(source), "-o", str(output), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert {"relative": "refusing to overwrite the input", "inside-zarr": "inside it",
            "inside-store": "inside the store"}[case] in err
    assert files_of(tmp_path) == before and oracle.build_calls == []


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, oracle, capsys):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((30, 40), np.uint8))
    (tmp_path / "some_file.txt").write_text("x")
    out = tmp_path / "some_file.txt" / "out.tif"
    assert main(["everything", str(tmp_path / "img.tif"), "-o", str(out)]) == 2
    assert "some_file.txt is a file" in capsys.readouterr().err
    assert oracle.build_calls == [] and oracle.encode_calls == 0  # no model, no work
    run = napari_sam("everything", tmp_path / "img.tif", "-o", out, "--model", "vit_t")
    assert run.returncode == 2 and "is a file" in one_line_error(run)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_any_work(tmp_path, oracle, capsys):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((30, 40), np.uint8))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["everything", str(tmp_path / "img.tif"), "-o", str(locked / "o.tif")]) == 2
    finally:
        locked.chmod(0o755)
    assert "writable" in capsys.readouterr().err and oracle.build_calls == []


def test_inputs_that_are_not_images_say_what_they_are(tmp_path, oracle, capsys):
    np.save(tmp_path / "channels.npy", np.zeros((32, 40, 2), np.uint16))
    (tmp_path / "text.npy").write_text("1 2 3\n4 5 6\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("x")
    EmbeddingStore.open(tmp_path / "s.zarr", np.zeros((2, 16, 16), np.uint8), FastOracle(256))
    cases = {
        "channels.npy": "got shape (32, 40, 2), i.e. 40 x 2 pixel images: its last axis (2) "
                        "looks like 2 channels",
        "text.npy": "text.npy is not a valid .npy array file",
        "objects.npy": "objects.npy is not a valid .npy array file for images: it holds Python objects",
        "folder": "is not a zarr array or group",
        "s.zarr": "is a napari-sam embedding store, not an image",
    }
    for name, message in cases.items():
        if name in ("channels.npy", "text.npy"):  # the installed command, as users meet it
            run = napari_sam("everything", tmp_path / name, "-o", tmp_path / "o.tif", "--model", "vit_t")
            assert run.returncode == 2, run.stderr
            line = one_line_error(run)
        else:
            assert main(["everything", str(tmp_path / name), "-o", str(tmp_path / "o.tif")]) == 2
            line = capsys.readouterr().err
        assert message in line and "pickle" not in line and "No group found" not in line
    assert not (tmp_path / "o.tif").exists() and oracle.build_calls == []


def test_a_tiny_image_is_refused_a_small_one_is_fine(tmp_path, oracle, capsys):
    np.save(tmp_path / "tiny.npy", np.zeros((5, 40), np.uint8))
    assert main(["everything", str(tmp_path / "tiny.npy"), "-o", str(tmp_path / "o.tif")]) == 2
    assert "at least 8 x 8 pixels" in capsys.readouterr().err
    np.save(tmp_path / "small.npy", np.zeros((8, 40), np.uint8))
    assert main(["everything", str(tmp_path / "small.npy"), "-o", str(tmp_path / "o.npy"),
                 *FLAGS]) == 0
    assert np.load(tmp_path / "o.npy").shape == (8, 40)


def test_atomic_write_keeps_the_earlier_file_on_failure(tmp_path):
    target = tmp_path / "labels.tif"
    target.write_bytes(b"earlier result")

    def half_then(exc):
        def write(f):
            f.write(b"half a file")
            raise exc
        return write

    for exc in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            write_atomic(target, half_then(exc))
        assert target.read_bytes() == b"earlier result"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no temporary left
    write_atomic(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_a_failed_write_exits_1_and_keeps_the_earlier_output(tmp_path, oracle, monkeypatch, capsys):
    image, _ = draw_objects((64, 80), grid=(2, 2), seed=1, radius=(8, 14))
    tifffile.imwrite(tmp_path / "img.tif", image)
    out = tmp_path / "labels.tif"
    out.write_bytes(b"earlier result")

    def full_disk(file, data, **kwargs):
        (open(file, "wb") if isinstance(file, (str, os.PathLike)) else file).write(b"II*\x00half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    assert main(["everything", str(tmp_path / "img.tif"), "-o", str(out), *FLAGS]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "labels.tif"]


def test_the_installed_command_replaces_an_earlier_output_whole(tmp_path, vit_t_args):
    tifffile.imwrite(tmp_path / "img.tif", draw_objects((64, 64), grid=(2, 2), seed=2)[0])
    out = tmp_path / "labels.tif"
    out.write_bytes(b"earlier result")
    os.chmod(out, 0o640)
    run = napari_sam("everything", tmp_path / "img.tif", "-o", out, *vit_t_args,
                     "--points-per-side", "4", "--quiet")
    assert run.returncode == 0, run.stderr
    labels = tifffile.imread(out)
    assert labels.shape == (64, 64) and labels.dtype == np.uint16
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # the earlier file's permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "labels.tif"]
