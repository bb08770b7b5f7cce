"""The README's command lines run as written (issue 10, item 2).

Every ``napari-sam …`` command of README.md (code blocks and inline code) runs in a fresh
process from the venv, in a folder holding small generated images under the README's file
names, with ``--checkpoint`` of a random-weight vit_t checkpoint appended (no download; with an AIS
decoder for micro-sam's models such as vit_t_lm). To keep
the test short, ``napari-sam everything`` also gets ``--points-per-side 4`` appended (the
last value wins; the grid itself is tested in test_cli_everything.py): the default 32 x 32
grid decodes 1024 prompts per slice, over a minute on two CPU cores.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_cli_embed import (
    NAPARI_SAM,
    napari_sam,
    random_vit_t_ais_checkpoint,
    random_vit_t_checkpoint,
)
from test_cli_large import write_ome_zarr

from napari_sam.model.zoo import zoo_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _blobs(shape, seed):
    """uint16 image or stack: a few bright discs on a dim noisy background."""
    rng = np.random.default_rng(seed)
    *_lead, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    out = rng.normal(200, 20, shape).clip(0).astype(np.uint16)
    for k in range(4):
        cy, cx, r = rng.uniform(15, h - 15), rng.uniform(15, w - 15), rng.uniform(6, 11)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        out[..., disc] += np.uint16(2000 + 500 * k)
    return out


# the README's input file names -> what the test writes there
INPUTS = {
    "cells.tif": lambda: _blobs((96, 128), 0),      # a 2D image
    "stack.tif": lambda: _blobs((2, 80, 96), 1),    # (Z, Y, X)
    "nuclei.tif": lambda: _blobs((2, 80, 96), 2),   # (Z, Y, X)
    "slide.tif": lambda: _blobs((1600, 900), 3),    # tiled (longer than 1.5 model inputs): 2 tiles
}
# zarr inputs (folders): name -> writer(path)
ZARR_INPUTS = {
    "tissue.ome.zarr": lambda path: write_ome_zarr(path, _blobs((1, 160, 200), 4), "cyx"),
}


def readme_commands() -> list[str]:
    """``napari-sam …`` lines of README.md: from code blocks (``#`` comments dropped) and
    from inline code spans."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if re.match(r"(\.venv/bin/)?napari-sam\s", line):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    spans = re.findall(r"`((?:\.venv/bin/)?napari-sam\s[^`]+)`", prose)
    commands += [c.strip() for c in spans if len(c.split()) >= 3]  # not a bare "napari-sam embed"
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands()


def test_the_readme_has_cli_examples_and_all_use_vit_t():
    work = [c for c in COMMANDS if "--help" not in c]
    assert len(work) >= 3, COMMANDS
    assert any(c.startswith(".venv/bin/napari-sam") for c in COMMANDS)  # how to run it
    for command in work:
        assert "--model vit_t" in command, f"README example without --model vit_t: {command}"


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.split()[:3]) for c in COMMANDS])
def test_readme_command_runs_as_written(command, tmp_path, tmp_path_factory):
    argv = shlex.split(command)
    argv[0] = str(NAPARI_SAM)  # `napari-sam` (venv activated) or `.venv/bin/napari-sam`
    for name in argv[2:]:
        if name in ZARR_INPUTS and not (tmp_path / name).exists():
            ZARR_INPUTS[name](tmp_path / name)
        if re.search(r"\.(tif|tiff|png|jpg|npy)$", name) and not (tmp_path / name).exists():
            previous = argv[argv.index(name) - 1]
            if previous not in ("-o", "--output"):
                assert name in INPUTS, f"README input {name!r}: add it to INPUTS"
                tifffile.imwrite(tmp_path / name, INPUTS[name]())
    if "--help" not in argv:
        model = argv[argv.index("--model") + 1] if "--model" in argv else "vit_b"
        with_decoder = zoo_model(model).has_decoder  # micro-sam's: with its AIS decoder
        checkpoint = (random_vit_t_ais_checkpoint if with_decoder else random_vit_t_checkpoint)
        argv += ["--checkpoint", str(checkpoint(tmp_path_factory))]
        if argv[1] == "everything":
            argv += ["--points-per-side", "4"]
    tiled = "slide.tif" in argv  # full-size tiles: each a 1024² encode (+ AIS decoder)
    result = napari_sam(*argv[1:], cwd=tmp_path, timeout=300 if tiled else 120)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    if "--help" in argv:
        assert "usage: napari-sam" in result.stdout
        return
    for flag in ("-o", "--store"):  # what it was asked to write is there
        if flag in argv:
            assert (tmp_path / argv[argv.index(flag) + 1]).exists(), command
    if "--ome-labels" in argv:
        name = argv[argv.index("--ome-labels") + 1]
        assert (tmp_path / argv[2] / "labels" / name).is_dir(), command


def test_readme_pictures_exist_are_small_and_come_from_the_script():
    """Every picture the README shows is in docs/images (and every one there is shown),
    at most 250 KB, and made by scripts/make_screenshots.py (which names them)."""
    text = README.read_text()
    shown = set(re.findall(r"\]\((docs/images/[^)]+\.png)\)", text))
    folder = README.parent / "docs" / "images"
    assert shown == {f"docs/images/{p.name}" for p in folder.glob("*.png")}
    assert len(shown) >= 4
    script = (README.parent / "scripts" / "make_screenshots.py").read_text()
    for path in shown:
        assert (README.parent / path).stat().st_size <= 250_000, path
        assert f'"{Path(path).name}"' in script, f"{path} is not made by make_screenshots.py"
    assert "scripts/make_screenshots.py" in text and "tests/oracle.py" in text
