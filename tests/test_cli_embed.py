"""``napari-sam embed``: precompute a stack into a store from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import patch_build_sam
from oracle import OracleSam
from test_store import snapshot

from napari_sam.cli import main
from napari_sam.engine.store import EmbeddingStore, StoreWriteError, read_store_info

# the installed console script, next to the venv's python
NAPARI_SAM = Path(sys.executable).with_name("napari-sam")
_CHECKPOINTS: dict[str, Path] = {}


def napari_sam(*args, timeout=300, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed ``napari-sam`` command (a fresh process, as a user would)."""
    return subprocess.run([str(NAPARI_SAM), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def random_vit_t_checkpoint(tmp_path_factory) -> Path:
    """A MobileSAM (vit_t) checkpoint with random weights: the real architecture, loadable
    with ``--model vit_t --checkpoint PATH`` by any process; made once per session."""
    if "vit_t" not in _CHECKPOINTS:
        from napari_sam.model import build_model, get_config

        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("ckpt") / "random_vit_t.pt"
        torch.save(build_model(get_config("vit_t")).state_dict(), path)
        _CHECKPOINTS["vit_t"] = path
    return _CHECKPOINTS["vit_t"]


def random_vit_t_ais_checkpoint(tmp_path_factory) -> Path:
    """The random vit_t of :func:`random_vit_t_checkpoint` with an AIS decoder, saved as
    micro-sam exports (``{"model_state": …, "decoder_state": …}``). Random decoder maps are
    mush with thousands of seeds (minutes of APG), so its last conv is flat: all
    foreground, one seed everywhere -> one object per slice whatever the image."""
    if "vit_t_ais" not in _CHECKPOINTS:
        from sam_factory import perturb_

        from napari_sam.model.instance_decoder import InstanceDecoder

        sam_state = torch.load(random_vit_t_checkpoint(tmp_path_factory), weights_only=True)
        decoder = perturb_(InstanceDecoder(256, 1024, transposed=True), seed=3)
        with torch.no_grad():
            decoder.out_conv.weight.zero_()
            decoder.out_conv.bias.copy_(torch.tensor([6.0, -6.0, -6.0]))
        path = tmp_path_factory.mktemp("ckpt") / "random_vit_t_ais.pt"
        torch.save({"model_state": sam_state, "decoder_state": decoder.state_dict()}, path)
        _CHECKPOINTS["vit_t_ais"] = path
    return _CHECKPOINTS["vit_t_ais"]


@pytest.fixture
def vit_t_args(tmp_path_factory):
    """CLI model arguments of the random vit_t checkpoint (fp32 CPU)."""
    return ["--model", "vit_t", "--checkpoint", random_vit_t_checkpoint(tmp_path_factory),
            "--device", "cpu", "--precision", "fp32"]


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


@pytest.mark.parametrize("case", ["missing", "5d", "suffix", "foreign", "center", "mismatch"])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, oracle, capsys, case):
    tif = tmp_path / "in.tif"
    tifffile.imwrite(tif, stack())
    store = tmp_path / "out.zarr"
    extra = []
    if case == "missing":
        tif = tmp_path / "nope.tif"
    elif case == "5d":
        np.save(tif := tmp_path / "in.npy", np.zeros((2, 2, 6, 40, 48), np.uint16))
    elif case == "suffix":
        tif = tmp_path / "in.png"
        tif.write_bytes(b"png")
    elif case == "foreign":
        store.mkdir()
        (store / "notes.txt").write_text("mine")
    elif case == "center":
        extra = ["--center", "99"]
    else:
        EmbeddingStore.open(store, stack() + 1, oracle)  # default: refused, not recomputed
    assert main(["embed", str(tif), "--store", str(store), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-sam embed: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert {"missing": "not found", "5d": "expected a stack (N, H, W)", "suffix": ".tif",
            "foreign": "refusing", "center": "--center",
            "mismatch": "different data (same shape, other pixels)"}[case] in err
    assert case != "mismatch" or "rerun with --on-mismatch recompute" in err


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


def test_a_mismatched_store_is_refused_unless_recompute(tmp_path, vit_t_args):
    np.save(tmp_path / "in.npy", stack(n=1))
    store = tmp_path / "s.zarr"
    args = ["embed", tmp_path / "in.npy", "--store", store, *vit_t_args, "--quiet"]
    first = napari_sam(*args)
    assert first.returncode == 0, first.stderr
    (store / "notes.txt").write_text("mine")
    before = snapshot(store)
    refused = napari_sam(*args, "--contrast-limits", "0", "100")
    assert refused.returncode == 2, refused.stderr
    line, = refused.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("napari-sam embed: error: store") and "different normalisation" in line
    assert "--on-mismatch recompute" in line
    assert snapshot(store) == before  # nothing deleted
    redo = napari_sam(*args, "--contrast-limits", "0", "100", "--on-mismatch", "recompute")
    assert redo.returncode == 0, redo.stderr
    assert "cleared" in redo.stderr
    info = read_store_info(store)
    assert info["n_ready"] == 1 and info["normalisation"]["contrast_limits"] == [0.0, 100.0]
    assert (store / "notes.txt").read_text() == "mine"


def test_offline_error_names_the_cli_option(tmp_path):
    np.save(tmp_path / "in.npy", stack(n=2))
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}  # every download fails at once: offline
    run = napari_sam("embed", tmp_path / "in.npy", "--store", tmp_path / "s.zarr", "--model",
                     "vit_t", "--quiet", env=env)
    assert run.returncode == 1, run.stderr
    assert "--checkpoint PATH" in run.stderr and "checkpoint=" not in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("case", ["under-a-file", "channels", "store-is-input"])
def test_store_and_input_are_checked_before_the_model_loads(tmp_path, oracle, capsys, case):
    np.save(tmp_path / "in.npy", stack())
    store, source = tmp_path / "s.zarr", tmp_path / "in.npy"
    if case == "under-a-file":
        (tmp_path / "file.txt").write_text("x")
        store = tmp_path / "file.txt" / "s.zarr"
    elif case == "channels":
        np.save(source, np.zeros((32, 40, 2), np.uint16))  # channel-last, not 32 images of 40x2
    else:
        store = source
    assert main(["embed", str(source), "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert {"under-a-file": "is a file", "channels": "looks like 2 channels",
            "store-is-input": "refusing to overwrite the input"}[case] in err
    assert oracle.build_calls == [] and oracle.encode_calls == 0
    assert np.load(source).shape in ((6, 40, 48), (32, 40, 2))


@pytest.mark.parametrize("colour", [False, True])
def test_a_large_2d_image_is_one_slice_of_tiles(tmp_path, oracle, capsys, colour):
    """A 2D image (H, W) or (H, W, 3) is a stack of one slice; --tiling auto tiles it (its
    longest side exceeds 1.5 model inputs: 700 > 1.5 x 256), a rerun encodes nothing, and a
    store of another tiling is refused, nothing deleted."""
    image = stack(n=1, h=600, w=700)[0]
    image = np.stack([image, image // 2, image // 3], axis=-1) if colour else image
    tifffile.imwrite(tmp_path / "big.tif", image)
    args = ["embed", str(tmp_path / "big.tif"), "--store", str(tmp_path / "s.zarr"), "--quiet"]
    assert main(args) == 0
    info = read_store_info(tmp_path / "s.zarr")
    assert info["tiling"] == {"tile_shape": [256, 256], "halo": [32, 32]}
    assert info["data"]["shape"] == [1, *image.shape] and info["n_ready"] == 12 == oracle.encode_calls
    err = capsys.readouterr().err
    assert "12 tiles of 256x256 pixels per slice" in err and "12/12 tiles ready" in err
    assert main(args) == 0 and oracle.encode_calls == 12  # resumed: nothing to encode
    assert main(args + ["--tiling", "off"]) == 2
    err = capsys.readouterr().err
    assert "different tiling (256x256 tiles, halo 32x32 in the store, off now)" in err
    assert read_store_info(tmp_path / "s.zarr")["n_ready"] == 12
    assert main(args + ["--tiling", "on", "--tile-shape", "300", "200", "--halo", "20",
                        "--on-mismatch", "recompute"]) == 0
    assert read_store_info(tmp_path / "s.zarr")["tiling"] == {"tile_shape": [300, 200], "halo": [20, 20]}
