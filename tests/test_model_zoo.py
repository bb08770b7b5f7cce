"""micro-sam's model zoo by name: registry, configs, xxh128-checked downloads, the CLI list."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from napari_sam.engine import weights
from napari_sam.engine.volume import run_generator
from napari_sam.model import MODEL_CONFIGS, get_config
from napari_sam.model.zoo import DOMAINS, ZOO, models_by_domain, zoo_model

MICRO_SAM = ["vit_t_lm", "vit_b_lm", "vit_l_lm", "vit_t_em_organelles", "vit_b_em_organelles",
             "vit_l_em_organelles", "vit_b_histopathology", "vit_l_histopathology",
             "vit_h_histopathology", "vit_b_medical_imaging"]


def test_every_micro_sam_model_is_known_with_its_decoder():
    for name in MICRO_SAM:
        model = zoo_model(name)
        assert model.has_decoder and model.architecture == name[:5]
        info, decoder = weights.CHECKPOINTS[name], weights.CHECKPOINTS[f"{name}_decoder"]
        assert weights.decoder_name(name) == f"{name}_decoder"
        for entry in (info, decoder):
            assert entry.digest_name == "xxh128" and len(entry.xxh128) == 32
            assert entry.url.startswith("https://")
        # cache names are unique even though several URLs end in ".../download"
        assert (info.filename, decoder.filename) == (f"{name}.pt", f"{name}_decoder.pt")
    assert weights.decoder_name("vit_b") is None
    assert len({i.filename for i in weights.CHECKPOINTS.values()}) == len(weights.CHECKPOINTS)


def test_micro_sam_registry_facts_match_micro_sam():
    """Our URLs and hashes are micro-sam's own (its models() registry)."""
    from reference_shim import import_segment_anything

    import_segment_anything()
    try:
        from micro_sam.util import models
    except ImportError as exc:
        pytest.skip(f"micro-sam is not installed (test-only: scripts/setup_env.sh --testing): {exc}")
    registry = models()
    for name in MICRO_SAM + [f"{n}_decoder" for n in MICRO_SAM]:
        assert registry.registry[name] == f"xxh128:{weights.CHECKPOINTS[name].xxh128}"
        assert registry.urls[name] == weights.CHECKPOINTS[name].url


def test_zoo_names_map_to_architectures():
    for name, model in ZOO.items():
        config = get_config(name)
        assert config.name == name
        arch = MODEL_CONFIGS[model.architecture]
        assert config.with_changes(name=arch.name) == arch
    with pytest.raises(ValueError, match="vit_b_lm"):
        get_config("vit_b_lmm")
    grouped = models_by_domain()
    assert [d for d, _ in grouped] == list(DOMAINS) and all(models for _, models in grouped)
    assert sum(len(m) for _, m in grouped) == len(ZOO)


def test_checkpoint_info_needs_exactly_one_hash():
    with pytest.raises(ValueError, match="exactly one"):
        weights.CheckpointInfo("x", "http://h/x.pt", None)
    with pytest.raises(ValueError, match="exactly one"):
        weights.CheckpointInfo("x", "http://h/x.pt", None, sha256="a", xxh128="b")


@pytest.fixture
def xxh_server(monkeypatch, tmp_path):
    """A local server holding a "vit_b_lm" and its decoder, registered with xxh128 hashes
    and no size (as micro-sam publishes them)."""
    import xxhash
    from test_weights_download import PAYLOAD, _Server

    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    srv = _Server()
    digest = xxhash.xxh128(PAYLOAD).hexdigest()
    for name in ("vit_b_lm", "vit_b_lm_decoder"):
        monkeypatch.setitem(weights.CHECKPOINTS, name,
                            weights.CheckpointInfo(name, srv.url, None, xxh128=digest, file_name=f"{name}.pt"))
    yield srv
    srv.close()


def test_xxh128_download_checks_and_remembers_the_hash(xxh_server, tmp_path):
    from test_weights_download import PAYLOAD

    progress = []
    job = weights.model_files_job("vit_b_lm")
    while True:
        try:
            progress.append(next(job))
        except StopIteration as stop:
            paths = stop.value
            break
    assert paths == (tmp_path / "cache" / "vit_b_lm.pt", tmp_path / "cache" / "vit_b_lm_decoder.pt")
    assert all(p.read_bytes() == PAYLOAD for p in paths)
    assert {p.model_type for p in progress} == {"vit_b_lm", "vit_b_lm_decoder"}
    assert progress[-1].done_bytes == len(PAYLOAD) and "MiB" in progress[-1].describe()
    assert weights.file_fingerprint(paths[0]) == hashlib.sha256(PAYLOAD).hexdigest()
    requests = xxh_server.requests
    assert run_generator(weights.model_files_job("vit_b_lm")) == paths  # cached: no request
    assert xxh_server.requests == requests


def test_xxh128_mismatch_saves_nothing(xxh_server, tmp_path, monkeypatch):
    info = weights.CHECKPOINTS["vit_b_lm"]
    monkeypatch.setitem(weights.CHECKPOINTS, "vit_b_lm",
                        weights.CheckpointInfo("vit_b_lm", info.url, None, xxh128="0" * 32,
                                               file_name="vit_b_lm.pt"))
    with pytest.raises(weights.CheckpointDownloadError) as err:
        run_generator(weights.download_job("vit_b_lm"))
    msg = str(err.value)
    assert "xxh128 mismatch" in msg and info.url in msg and str(tmp_path / "cache" / "vit_b_lm.pt") in msg
    assert not (tmp_path / "cache" / "vit_b_lm.pt").exists()


def test_offline_message_names_url_and_path(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(weights.CHECKPOINTS, "vit_t_lm",
                        weights.CheckpointInfo("vit_t_lm", "http://127.0.0.1:9/vit_t.pt", None,
                                               xxh128="0" * 32, file_name="vit_t_lm.pt"))
    with pytest.raises(weights.CheckpointDownloadError) as err:
        run_generator(weights.download_job("vit_t_lm", timeout_s=2))
    msg = str(err.value)
    assert "http://127.0.0.1:9/vit_t.pt" in msg and str(tmp_path / "cache" / "vit_t_lm.pt") in msg


def test_cli_lists_models_by_domain_and_accepts_zoo_names():
    out = subprocess.run([sys.executable, "-m", "napari_sam.cli", "models"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    for domain in DOMAINS:
        assert f"{domain}:" in out.stdout
    for name in MICRO_SAM:
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "napari_sam.cli", "embed", "x.tif", "--store", "s.zarr",
                          "--model", "vit_b_lmm"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "vit_b_lm" in bad.stderr


def test_a_failed_decoder_download_leaves_a_usable_model(xxh_server, tmp_path, monkeypatch):
    """The decoder is extra: if it cannot be fetched, the model still loads (with a warning
    naming decoder_checkpoint, the URL and where to put the file)."""
    monkeypatch.setitem(weights.CHECKPOINTS, "vit_b_lm_decoder",
                        weights.CheckpointInfo("vit_b_lm_decoder", "http://127.0.0.1:9/d.pt", None,
                                               xxh128="0" * 32, file_name="vit_b_lm_decoder.pt"))
    with pytest.warns(UserWarning, match="without its AIS decoder") as record:
        paths = run_generator(weights.model_files_job("vit_b_lm"))
    assert paths == (tmp_path / "cache" / "vit_b_lm.pt", None)
    message = str(record[0].message)
    assert "decoder_checkpoint=" in message and "http://127.0.0.1:9/d.pt" in message
    from napari_sam._cli import cli_wording

    assert "--decoder-checkpoint PATH" in cli_wording(message)


def test_assigning_a_decoder_keeps_sams_state_dict():
    import torch
    from sam_factory import TINY_VIT_B

    from napari_sam.model import build_model
    from napari_sam.model.instance_decoder import InstanceDecoder

    model = build_model(TINY_VIT_B)
    keys = set(model.state_dict())
    model.instance_decoder = InstanceDecoder(256, TINY_VIT_B.img_size)
    assert set(model.state_dict()) == keys and not model.instance_decoder.training
    model.to(torch.float64)  # follows the model
    assert next(model.instance_decoder.parameters()).dtype == torch.float64
