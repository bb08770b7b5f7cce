"""Checkpoint files: loading, clear errors for bad files, offline download, cache."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from napari_sam import CheckpointDownloadError, CheckpointError, build_sam
from napari_sam.engine import weights
from napari_sam.model.checkpoint import guess_model_type, read_checkpoint, read_state_dict


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


SIDE_EFFECTS = []


def record_side_effect(value):
    """What a malicious checkpoint would call (harmless here): proves whether code ran."""
    SIDE_EFFECTS.append(value)
    return value


class _CallsModuleFunction:
    def __reduce__(self):
        return (record_side_effect, ("ran",))


class _CallsPrint:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _assert_refused_for_code(path, called):
    SIDE_EFFECTS.clear()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert "refused" in msg and "would run code" in msg, msg
    assert called in msg  # names what it would call
    assert "truncated or corrupt" not in msg and "download it again" not in msg
    assert "torch.save(model.state_dict(), path)" in msg  # how to export plain weights
    assert str(path) in msg
    assert SIDE_EFFECTS == []  # and nothing ran


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": torch.zeros(1), "payload": _RunsCode()}, bad)
    _assert_refused_for_code(bad, "system")


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("payload, called", [(_CallsPrint, "print"), (_CallsModuleFunction, "record_side_effect")])
def test_raw_pickle_with_code_is_refused_not_called_corrupt(tmp_path, protocol, payload, called):
    """Protocol 4/5 pickles stop torch's weights-only unpickler before it reaches the global
    ("Unsupported operand 149"): it used to be reported as a truncated or corrupt file."""
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"image_encoder.x": torch.zeros(1), "payload": payload()}, protocol=protocol))
    _assert_refused_for_code(bad, called)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_code_is_refused(tmp_path, legacy):
    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "payload": _CallsModuleFunction()}, bad, _use_new_zipfile_serialization=not legacy)
    _assert_refused_for_code(bad, "record_side_effect")


def test_plain_pickle_is_refused(tmp_path):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match="would run code"):
        read_state_dict(bad)


def test_unreadable_file_says_permission_denied(tmp_path):
    path = tmp_path / "locked.pth"
    torch.save({"w": torch.zeros(1)}, path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user (root) who can read a chmod 000 file")
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
    finally:
        path.chmod(0o600)
    msg = str(info.value)
    assert "permission denied" in msg and str(path) in msg
    assert "download it again" not in msg and "corrupt" not in msg


@pytest.mark.parametrize("where", ["access-check", "torch.load"])
def test_permission_denied_is_reported_as_such(tmp_path, monkeypatch, where):
    """The same without chmod (so it runs as root too): the up-front access check fails, or
    it passes and reading fails anyway (ACLs, root squash on NFS…)."""
    from napari_sam.model import checkpoint

    path = tmp_path / "locked.pth"
    torch.save({"w": torch.zeros(1)}, path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    if where == "torch.load":
        monkeypatch.setattr(torch, "load", denied)
    else:
        monkeypatch.setattr(checkpoint.os, "access", lambda p, mode: False)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert "permission denied" in msg and str(path) in msg and "download it again" not in msg


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"model_state": _prefixed(sd, "sam."), "optimizer_state": {"state": {}, "param_groups": []},
                                 "epoch": 12, "best_metric": 0.25}, id="torch_em-trainer-sam-prefix"),
        pytest.param(lambda sd: {"model_state": sd}, id="micro_sam-exported"),
        pytest.param(lambda sd: _prefixed(sd, "module."), id="ddp"),
        pytest.param(lambda sd: {"model": _prefixed(sd, "module.sam.")}, id="model-ddp-sam"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 10}, id="state_dict"),
        pytest.param(lambda sd: {"state_dict": {"model": sd}}, id="nested"),
    ],
)
def test_fine_tuned_checkpoint_shapes_load(tiny_reference_and_checkpoint, tmp_path, wrap):
    """Wrapped / prefixed checkpoints (micro-sam, torch_em, DDP) used to be reported as
    'not a Segment Anything checkpoint'; they load, still with weights_only=True."""
    from sam_factory import TINY_VIT_B

    ref, _ = tiny_reference_and_checkpoint
    path = tmp_path / "finetuned.pt"
    torch.save(wrap(ref.state_dict()), path)
    loaded = read_state_dict(path)
    assert set(loaded) == set(ref.state_dict())
    model = build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="fp32")
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_prefix_is_kept_unless_every_key_has_it():
    from napari_sam.model.checkpoint import _unwrap_state_dict

    mixed = {"sam.image_encoder.x": torch.zeros(1), "iou_head.y": torch.zeros(1)}
    assert set(_unwrap_state_dict(mixed, "f")) == set(mixed)
    assert set(_unwrap_state_dict({"module.a": torch.zeros(1), "module.b": torch.zeros(1)}, "f")) == {"a", "b"}


def test_wrapper_without_tensors_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model_state": {"w": torch.zeros(1), "step": 3}}, path)
    with pytest.raises(CheckpointError, match=r"dict of tensors.*'step': int"):
        read_state_dict(path)


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
    official = {"vit_b", "vit_l", "vit_h", "vit_t"}
    assert official <= set(weights.CHECKPOINTS)
    assert weights.CHECKPOINTS["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert weights.CHECKPOINTS["vit_h"].filename == "sam_vit_h_4b8939.pth"
    assert weights.CHECKPOINTS["vit_l"].filename == "sam_vit_l_0b3195.pth"
    assert all(len(weights.CHECKPOINTS[m].sha256) == 64 for m in official)


def test_bad_decoder_state_is_refused_with_a_clear_message(tiny_reference_and_checkpoint, tmp_path):
    """A micro-sam style file whose decoder_state does not fit: refused, nothing half-loaded."""
    from sam_factory import TINY_VIT_B

    ref, _ = tiny_reference_and_checkpoint
    path = tmp_path / "ais.pt"
    torch.save({"model_state": ref.state_dict(), "decoder_state": {"base.x": torch.zeros(3)}}, path)
    sam_state, decoder_state = read_checkpoint(path)
    assert set(sam_state) == set(ref.state_dict()) and set(decoder_state) == {"base.x"}
    with pytest.raises(CheckpointError, match="decoder"):
        build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="fp32")


def test_checkpoint_without_decoder_has_no_instance_decoder(tiny_reference_and_checkpoint):
    from sam_factory import TINY_VIT_B

    _, path = tiny_reference_and_checkpoint
    model = build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="fp32")
    assert model.instance_decoder is None


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
