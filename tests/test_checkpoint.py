"""Checkpoint files: loading, clear errors for bad files, offline download, cache."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from napari_sam import CheckpointDownloadError, CheckpointError, build_sam
from napari_sam.engine import weights
from napari_sam.model.checkpoint import guess_model_type, read_state_dict


def test_build_sam_loads_reference_checkpoint(tiny_reference_and_checkpoint, tiny_sam):
    ref, path = tiny_reference_and_checkpoint
    assert not tiny_sam.training
    ours = tiny_sam.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    assert tiny_sam.checkpoint_sha256 == weights.sha256_of(path)
    assert tiny_sam.signature.startswith("vit_b:")


def test_truncated_checkpoint_gives_clear_error(tiny_reference_and_checkpoint, tmp_path):
    _, path = tiny_reference_and_checkpoint
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_sam("vit_b", checkpoint=bad, device="cpu")


@pytest.mark.parametrize("seed", range(20))
def test_garbage_file_gives_clear_error(tmp_path, seed):
    """Random bytes break torch.load in many different ways; each gives the same clear error."""
    import numpy as np

    bad = tmp_path / "garbage.pth"
    bad.write_bytes(np.random.default_rng(seed).bytes(1000))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_sam("vit_t", checkpoint=bad, device="cpu")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": torch.zeros(1), "payload": _RunsCode()}, bad)
    with pytest.raises(CheckpointError, match="could run code"):
        read_state_dict(bad)


def test_plain_pickle_is_refused(tmp_path):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError):
        read_state_dict(bad)


def test_missing_file_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_sam("vit_b", checkpoint=tmp_path / "nope.pth", device="cpu")


def test_wrong_model_type_names_both_types(tiny_reference_and_checkpoint):
    """A ViT checkpoint loaded as vit_t: the error says what was expected and what it looks like."""
    _, path = tiny_reference_and_checkpoint
    with pytest.raises(CheckpointError) as info:
        build_sam("vit_t", checkpoint=path, device="cpu")
    msg = str(info.value)
    assert "'vit_t'" in msg
    assert "looks like a ViT SAM of width 96 and depth 2" in msg
    assert "missing keys (" in msg and "unexpected keys (" in msg and "image_encoder." in msg


def test_guess_model_type_from_official_shapes():
    def fake(width, depth):
        sd = {f"image_encoder.blocks.{i}.attn.qkv.weight": torch.empty(0) for i in range(depth)}
        sd["image_encoder.blocks.0.attn.qkv.weight"] = torch.empty(3 * width, width)
        return sd

    assert guess_model_type(fake(768, 12)) == "vit_b"
    assert guess_model_type(fake(1024, 24)) == "vit_l"
    assert guess_model_type(fake(1280, 32)) == "vit_h"
    assert guess_model_type({"image_encoder.layers.0.blocks.0.x": torch.empty(0)}) == "vit_t"
    assert guess_model_type({"fc.weight": torch.empty(0)}) is None


def test_not_a_sam_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a Segment Anything checkpoint"):
        build_sam("vit_b", checkpoint=path, device="cpu")


def test_offline_download_gives_actionable_error(monkeypatch, tmp_path):
    """No network: the error names the URL, the exact path to drop the file and the env var."""
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    info = weights.CheckpointInfo("vit_t", "http://127.0.0.1:9/mobile_sam.pt", 10, "0" * 64)
    monkeypatch.setitem(weights.CHECKPOINTS, "vit_t", info)
    with pytest.raises(CheckpointDownloadError) as err:
        build_sam("vit_t", device="cpu")
    msg = str(err.value)
    assert "http://127.0.0.1:9/mobile_sam.pt" in msg
    assert str(tmp_path / "cache" / "mobile_sam.pt") in msg
    assert "NAPARI_SAM_CACHE" in msg
    # nothing half-written is left where a later run would pick it up
    assert not (tmp_path / "cache" / "mobile_sam.pt").exists()


def test_cached_official_file_is_used_without_network(monkeypatch, tmp_path, tiny_reference_and_checkpoint):
    _, path = tiny_reference_and_checkpoint
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))
    (tmp_path / "tiny.pth").write_bytes(path.read_bytes())
    info = weights.CheckpointInfo("vit_b", "http://127.0.0.1:9/tiny.pth", 1, weights.sha256_of(path))
    monkeypatch.setitem(weights.CHECKPOINTS, "vit_b", info)
    assert weights.fetch_checkpoint("vit_b") == tmp_path / "tiny.pth"


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "x"))
    assert weights.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("NAPARI_SAM_CACHE")
    assert "napari-sam" in str(weights.cache_dir())


def test_registry_has_official_files():
    assert set(weights.CHECKPOINTS) == {"vit_b", "vit_l", "vit_h", "vit_t"}
    assert weights.CHECKPOINTS["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert weights.CHECKPOINTS["vit_h"].filename == "sam_vit_h_4b8939.pth"
    assert weights.CHECKPOINTS["vit_l"].filename == "sam_vit_l_0b3195.pth"
    assert all(len(i.sha256) == 64 for i in weights.CHECKPOINTS.values())


def test_fingerprint_is_remembered(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc")
    calls = []
    real = weights.sha256_of
    monkeypatch.setattr(weights, "sha256_of", lambda p: calls.append(p) or real(p))
    first = weights.file_fingerprint(f)
    assert weights.file_fingerprint(f) == first and len(calls) == 1
    f.write_bytes(b"abcd")  # changed file -> hashed again
    assert weights.file_fingerprint(f) != first and len(calls) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_type="vit_x"), "model_type"),
        (dict(model_type="vit_b", device="tpu9"), "device"),
        (dict(model_type="vit_b", precision="fp8"), "precision"),
        (dict(model_type="vit_b", device="cpu", precision="fp16"), "fp16"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        build_sam(checkpoint=tmp_path / "unused.pth", **kwargs)
