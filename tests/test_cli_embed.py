"""``napari-sam embed``: precompute a stack into a store from the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from oracle import OracleSam

import napari_sam.engine
from conftest import patch_build_sam
from napari_sam.cli import main
from napari_sam.engine.store import EmbeddingStore, StoreWriteError, read_store_info


def stack(n=6, h=40, w=48):
    z, y, x = np.mgrid[:n, :h, :w]
    return ((((y - 20) ** 2 + (x - 24) ** 2) <= (6 + z) ** 2) * 3000).astype(np.uint16)


@pytest.fixture
def oracle(monkeypatch):
    """``build_sam`` returns one counting oracle model (no weights, no download)."""
    model = OracleSam(256)
    return patch_build_sam(monkeypatch, model)


def test_embed_a_tif_then_rerun_encodes_nothing(tmp_path, oracle, capsys):
    tifffile.imwrite(tmp_path / "in.tif", stack())
    out = tmp_path / "out.zarr"
    args = ["embed", str(tmp_path / "in.tif"), "--store", str(out), "--model", "vit_t",
            "--checkpoint", "w.pt", "--device", "cpu"]
    assert main(args) == 0
    assert oracle.build_calls == [("vit_t", "w.pt", "cpu", "auto")]
    assert oracle.encode_calls == 6 and read_store_info(out)["n_ready"] == 6
    err = capsys.readouterr().err
    assert "created" in err and "6/6 slices ready" in err and "embed" in err  # tqdm bar
    assert main(args + ["--quiet"]) == 0
    assert oracle.encode_calls == 6  # reopened: 0 more encoder calls
    assert "reusing" in capsys.readouterr().err
    store = EmbeddingStore.open(out, tifffile.imread(tmp_path / "in.tif"), oracle)
    assert store.status.state == "reused" and store.ready.all()


def test_compressed_tif_npy_and_axis(tmp_path, oracle):
    data = stack()
    tifffile.imwrite(tmp_path / "zip.tif", data, compression="zlib")  # not memory-mappable
    assert main(["embed", str(tmp_path / "zip.tif"), "--store", str(tmp_path / "a.zarr"), "--quiet"]) == 0
    np.save(tmp_path / "in.npy", np.moveaxis(data, 0, 2))  # (H, W, N)
    assert main(["embed", str(tmp_path / "in.npy"), "--store", str(tmp_path / "b.zarr"),
                 "--axis", "2", "--center", "0", "--contrast-limits", "0", "3000", "--quiet"]) == 0
    info = read_store_info(tmp_path / "b.zarr")
    assert info["data"]["axis"] == 2 and info["n_ready"] == 6
    assert info["normalisation"]["contrast_limits"] == [0.0, 3000.0]


@pytest.mark.parametrize("case", ["missing", "2d", "suffix", "foreign", "center", "mismatch"])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, oracle, capsys, case):
    tif = tmp_path / "in.tif"
    tifffile.imwrite(tif, stack())
    store = tmp_path / "out.zarr"
    extra = []
    if case == "missing":
        tif = tmp_path / "nope.tif"
    elif case == "2d":
        tifffile.imwrite(tif, stack()[0])
    elif case == "suffix":
        tif = tmp_path / "in.png"
        tif.write_bytes(b"png")
    elif case == "foreign":
        store.mkdir()
        (store / "notes.txt").write_text("mine")
    elif case == "center":
        extra = ["--center", "99"]
    else:
        EmbeddingStore.open(store, stack() + 1, oracle)
        extra = ["--on-mismatch", "error"]
    assert main(["embed", str(tif), "--store", str(store), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-sam embed: error:") and "Traceback" not in err
    assert {"missing": "not found", "2d": "expected a 3D stack", "suffix": ".tif",
            "foreign": "refusing", "center": "--center", "mismatch": "different data"}[case] in err


def test_unknown_device_exits_2_without_downloading(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "in.tif", stack())
    code = main(["embed", str(tmp_path / "in.tif"), "--store", str(tmp_path / "o.zarr"),
                 "--device", "tpu9"])
    assert code == 2 and "device" in capsys.readouterr().err


def test_full_disk_exits_1_and_a_rerun_resumes(tmp_path, oracle, monkeypatch, capsys):
    tifffile.imwrite(tmp_path / "in.tif", stack())
    args = ["embed", str(tmp_path / "in.tif"), "--store", str(tmp_path / "o.zarr"), "--quiet"]
    put = EmbeddingStore.put
    budget = [2]

    def failing_put(self, index, embedding):
        if budget[0] == 0:
            raise StoreWriteError("could not write slice: No space left on device")
        budget[0] -= 1
        return put(self, index, embedding)

    monkeypatch.setattr(EmbeddingStore, "put", failing_put)
    assert main(args) == 1
    assert "No space left" in capsys.readouterr().err
    assert read_store_info(tmp_path / "o.zarr")["n_ready"] == 2
    monkeypatch.setattr(EmbeddingStore, "put", put)
    calls = oracle.encode_calls
    assert main(args) == 0
    assert oracle.encode_calls - calls == 4  # only the missing slices


def test_interrupt_exits_130_and_keeps_slices(tmp_path, oracle, monkeypatch, capsys):
    tifffile.imwrite(tmp_path / "in.tif", stack())
    encode = EmbeddingStore.encode
    seen = []

    def interrupted(self, index):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(index)
        return encode(self, index)

    monkeypatch.setattr(EmbeddingStore, "encode", interrupted)
    code = main(["embed", str(tmp_path / "in.tif"), "--store", str(tmp_path / "o.zarr"), "--quiet"])
    assert code == 130 and "resume" in capsys.readouterr().err
    assert read_store_info(tmp_path / "o.zarr")["n_ready"] == 3


def test_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "napari_sam.cli", "embed", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--store" in out.stdout and "Exit codes" in out.stdout
