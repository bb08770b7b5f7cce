"""AIS / APG / AMG end to end: the engine API, the docked Segment Everything widget and the
installed CLI, with the oracle (its AIS decoder outputs perfect maps of the encoded image's
objects, so geometry — crops, resizes, scale, slices — is checked) and with random weights
through real checkpoints in micro-sam's format."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import dock
from oracle import OracleInstanceDecoder, with_instance_decoder
from test_automatic_oracle import FastOracle, draw_objects, iou

from napari_sam._napari.session import session_for
from napari_sam.engine.instances import SamInstanceSegmenter, predict_decoder_outputs
from napari_sam.engine.predictor import SamPredictor


def oracle_with_decoder(image_size: int = 256) -> FastOracle:
    return with_instance_decoder(FastOracle(image_size=image_size))


def assert_recovers(labels: np.ndarray, truth: np.ndarray, min_iou: float = 0.9) -> list[int]:
    """Every true object is one label (IoU >= min_iou), distinct objects distinct labels."""
    ids = []
    for t in truth:
        values, counts = np.unique(labels[t], return_counts=True)
        best = int(values[np.argmax(counts)])
        assert best != 0, "an object was missed"
        assert iou(labels == best, t) >= min_iou, f"object {best}: IoU {iou(labels == best, t):.3f}"
        ids.append(best)
    assert len(set(ids)) == len(truth)
    return ids


# ---------------------------------------------------------------------------- engine
# (shape, grid, min IoU): padding of rows / cols, an upscale x2, a downscale 300 -> 256
# (the oracle sees the image at 256: a 1-pixel rim of quantisation, IoU ~0.88 on small boxes)
@pytest.mark.parametrize("shape, grid, min_iou", [((200, 256), (3, 3), 0.9), ((256, 180), (3, 3), 0.9),
                                                  ((128, 96), (2, 2), 0.9), ((300, 300), (3, 3), 0.85)])
def test_ais_recovers_the_objects_through_resize_and_padding(shape, grid, min_iou):
    image, truth = draw_objects(shape, grid=grid, seed=4, radius=(12, 30))
    model = oracle_with_decoder()
    result = SamInstanceSegmenter(model).segment(image)
    assert result.mode == "ais" and result.labels.dtype == np.uint32 and result.labels.shape == shape
    assert result.n_objects == len(truth)
    assert_recovers(result.labels, truth, min_iou)
    fg = result.decoder_outputs.foreground
    assert fg.shape == shape and iou(fg > 0.5, truth.any(0)) >= 0.9


def test_ais_and_apg_run_on_a_stored_embedding_without_the_encoder():
    image, truth = draw_objects((220, 240), grid=(2, 3), seed=7)
    model = oracle_with_decoder()
    embedding = SamPredictor(model).encode_image(image)
    calls = model.encode_calls
    # APG's masks come from the oracle's point decoder, which leaves out the blurred rim of
    # a resized object (IoU ~0.9); AIS's maps include it
    for mode, min_iou in (("ais", 0.95), ("apg", 0.85)):
        result = SamInstanceSegmenter(model, mode).segment(embedding=embedding)  # no pixels needed
        assert model.encode_calls == calls, f"{mode} encoded again"
        assert_recovers(result.labels, truth, min_iou)
    with pytest.raises(ValueError, match="pixels"):
        SamInstanceSegmenter(model, "amg").segment(embedding=embedding)


def test_decoder_outputs_refuse_foreign_embeddings_and_models_without_decoder():
    image, _ = draw_objects((128, 128), grid=(2, 2), seed=1)
    model = oracle_with_decoder()
    embedding = SamPredictor(model).encode_image(image)
    other = FastOracle(image_size=256)
    other.signature = "another:model"
    with pytest.raises(ValueError, match="AIS decoder"):
        predict_decoder_outputs(other, embedding)
    with pytest.raises(ValueError, match="mode 'amg'"):
        SamInstanceSegmenter(other, "ais")
    other.instance_decoder = OracleInstanceDecoder(other)
    with pytest.raises(ValueError, match="made by"):
        predict_decoder_outputs(other, embedding)
    with pytest.raises(ValueError, match="mode"):
        SamInstanceSegmenter(model, "everything")


def test_stack_links_objects_and_cancel_returns_none():
    image, truth = draw_objects((160, 200), grid=(2, 2), seed=2)
    stack = np.stack([image, np.roll(image, 3, axis=1), np.roll(image, 6, axis=1)])
    segmenter = SamInstanceSegmenter(oracle_with_decoder())
    from napari_sam.engine.automatic import run_to_end

    labels = run_to_end(segmenter.stack_job(stack))
    assert labels.shape == stack.shape and labels.dtype == np.uint32
    ids = assert_recovers(labels[0], truth)
    for z in (1, 2):  # linked: the same ids through z
        assert_recovers(labels[z], np.roll(truth, 3 * z, axis=2))
        assert set(np.unique(labels[z])) - {0} == set(ids)
    import threading

    cancel = threading.Event()
    cancel.set()
    assert run_to_end(segmenter.stack_job(stack, cancel=cancel)) is None


# ---------------------------------------------------------------------------- widget


def docked(viewer, model):
    widget = dock(viewer, "Segment Everything")
    session_for(viewer).set_model(model)
    return widget


@pytest.mark.gui
def test_widget_defaults_to_ais_and_writes_where_the_image_is_shown(viewer, tmp_path):
    image, truth = draw_objects((220, 256), grid=(3, 3), seed=3, radius=(12, 30))
    layer = viewer.add_image(image, scale=(0.5, 2.0), translate=(10, -4))
    model = oracle_with_decoder()
    widget = docked(viewer, model)
    assert widget.mode == "ais" and "AIS decoder" in widget._model_label.text()
    viewer.screenshot(str(tmp_path / "everything_ais.png"), canvas_only=False)

    labels = widget.run(scope="slice", wait=True)
    assert labels is not None, widget.status
    np.testing.assert_allclose(labels.scale, layer.scale)
    np.testing.assert_allclose(labels.translate, layer.translate)
    assert_recovers(labels.data, truth)
    assert f"{len(truth)} objects written" in widget.status
    labels.undo()  # one undo step
    assert labels.data.max() == 0


@pytest.mark.gui
def test_widget_apg_and_stack_linking(viewer):
    image, truth = draw_objects((180, 200), grid=(2, 3), seed=5)
    stack = np.stack([image, image, np.roll(image, 4, axis=0)])
    viewer.add_image(stack)
    widget = docked(viewer, oracle_with_decoder())
    widget.set_mode("apg")
    widget.set_params(min_size=10, link_iou=0.3)
    assert widget.params["min_size"] == 10 and widget.params["link_iou"] == 0.3
    labels = widget.run(scope="stack", wait=True)
    assert labels is not None, widget.status
    assert labels.data.shape == stack.shape
    ids = assert_recovers(labels.data[0], truth, 0.85)  # APG: see above
    assert_recovers(labels.data[2], np.roll(truth, 4, axis=1), 0.85)
    assert set(np.unique(labels.data[1])) - {0} == set(ids)


@pytest.mark.gui
def test_model_without_decoder_offers_amg_only_and_explains(viewer):
    image, _ = draw_objects((128, 128), grid=(2, 2), seed=1)
    viewer.add_image(image)
    widget = docked(viewer, FastOracle(image_size=256))
    assert widget.mode == "amg" and "AMG only" in widget._model_label.text()
    combo = widget._mode
    assert not combo.model().item(combo.findData("ais")).isEnabled()
    widget.set_mode("ais")  # a script can still ask: the status line says why not
    assert widget.run(scope="slice", wait=True) is None
    assert "decoder" in widget.status and len(viewer.layers) == 1
    with pytest.raises(ValueError, match="parameter"):
        widget.set_params(points_per_sid=3)


class SlowInstanceDecoder(OracleInstanceDecoder):
    def __call__(self, *args):
        time.sleep(0.4)
        return super().__call__(*args)


@pytest.mark.gui
def test_cancel_of_an_ais_stack_acts_within_a_second(viewer, qtbot):
    image, _ = draw_objects((128, 128), grid=(2, 2), seed=1)
    viewer.add_image(np.stack([image] * 12))
    model = FastOracle(image_size=256)
    model.instance_decoder = SlowInstanceDecoder(model)
    widget = docked(viewer, model)
    widget.run(scope="stack", wait=False)
    qtbot.waitUntil(lambda: model.instance_decoder.calls >= 1, timeout=20000)
    start = time.monotonic()
    widget.cancel()
    assert widget.wait(5)
    assert time.monotonic() - start < 1.0
    assert "cancelled" in widget.status and len(viewer.layers) == 1


# ---------------------------------------------------------------------------- CLI
def test_cli_everything_modes(tmp_path, tmp_path_factory):
    import tifffile
    from test_cli_embed import napari_sam, random_vit_t_ais_checkpoint

    ais_checkpoint = random_vit_t_ais_checkpoint(tmp_path_factory)
    image, _ = draw_objects((96, 120), grid=(2, 2), seed=1)
    stack = np.stack([image, image])
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack)
    out = tmp_path / "labels.tif"
    tifffile.imwrite(tmp_path / "image.tif", image)
    for mode, path in (("ais", src), ("apg", tmp_path / "image.tif")):  # 3 slices: the decoder is slow
        proc = napari_sam("everything", str(path), "-o", str(out), "--model", "vit_t",
                          "--checkpoint", str(ais_checkpoint), "--mode", mode, "--min-size", "0",
                          "--device", "cpu", "--quiet")
        assert proc.returncode == 0, proc.stderr
        labels = tifffile.imread(out)
        assert labels.shape == tifffile.imread(path).shape and labels.dtype in (np.uint16, np.uint32)
        if mode == "ais":  # flat maps: one object; APG's masks come from random SAM weights
            assert "1 objects in" in proc.stderr and (labels == 1).all()
        else:
            assert labels.max() >= 1 and "objects in" in proc.stderr
    # a model without a decoder: mode ais is refused before any work, amg is the default
    from test_cli_embed import random_vit_t_checkpoint

    plain = random_vit_t_checkpoint(tmp_path_factory)
    proc = napari_sam("everything", str(src), "-o", str(tmp_path / "x.tif"), "--model", "vit_t",
                      "--checkpoint", str(plain), "--mode", "ais", "--device", "cpu")
    assert proc.returncode == 2 and "decoder" in proc.stderr and not (tmp_path / "x.tif").exists()
    assert isinstance(proc, subprocess.CompletedProcess)


def test_cli_embed_then_everything_from_the_store_encodes_nothing(tmp_path, monkeypatch, capsys):
    """The README's order: `napari-sam embed … --store`, then `everything --store`: AIS and
    APG read every slice from the store (no encoder call) and find the objects; a store of
    another stack is refused, and the store is unchanged."""
    import tifffile
    from conftest import patch_build_sam
    from test_store import snapshot

    from napari_sam.cli import main

    image, truth = draw_objects((120, 150), grid=(2, 2), seed=6)
    stack = np.stack([image, np.roll(image, 5, axis=1)])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    model = patch_build_sam(monkeypatch, oracle_with_decoder())
    store = tmp_path / "stack.zarr"
    assert main(["embed", str(tmp_path / "stack.tif"), "--store", str(store), "--model", "vit_t_lm",
                 "--quiet"]) == 0
    assert model.encode_calls == 2
    before = snapshot(store)
    for mode in ("ais", "apg"):
        out = tmp_path / f"{mode}.tif"
        assert main(["everything", str(tmp_path / "stack.tif"), "-o", str(out), "--model", "vit_t_lm",
                     "--mode", mode, "--store", str(store), "--quiet"]) == 0, capsys.readouterr().err
        assert model.encode_calls == 2, f"{mode} encoded again"
        labels = tifffile.imread(out)
        assert_recovers(labels[0], truth, 0.85)
        assert_recovers(labels[1], np.roll(truth, 5, axis=2), 0.85)
    assert snapshot(store) == before
    tifffile.imwrite(tmp_path / "other.tif", stack[:, ::-1])
    code = main(["everything", str(tmp_path / "other.tif"), "-o", str(tmp_path / "x.tif"), "--model",
                 "vit_t_lm", "--store", str(store), "--quiet"])
    assert code == 2 and "different" in capsys.readouterr().err and snapshot(store) == before


@pytest.mark.gui
def test_store_made_by_the_cli_serves_ais_in_napari(viewer, tmp_path, tmp_path_factory):
    """The README's order across CLI and napari with a real model (random vit_t with an AIS
    decoder, micro-sam's checkpoint format): `napari-sam embed --store`, open the store in
    the Segment Anything widget, run Segment Everything (AIS, whole stack): no encoder call,
    labels written, the store untouched."""
    import tifffile
    from test_cli_embed import napari_sam, random_vit_t_ais_checkpoint

    from napari_sam import build_sam

    image, _ = draw_objects((64, 80), grid=(2, 2), seed=2)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([image, image]))
    checkpoint = random_vit_t_ais_checkpoint(tmp_path_factory)
    store_path = tmp_path / "s.zarr"
    done = napari_sam("embed", tmp_path / "stack.tif", "--store", store_path, "--model", "vit_t_lm",
                      "--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    files_before = sorted(p.relative_to(store_path) for p in store_path.rglob("*"))

    layer = viewer.add_image(tifffile.imread(tmp_path / "stack.tif"), name="stack")
    widget = dock(viewer, "Segment Anything")
    widget.segmenter.auto_encode = False
    model = build_sam("vit_t_lm", checkpoint=checkpoint, device="cpu", precision="fp32")
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    widget.set_model(model)
    widget.set_image_layer(layer)
    assert widget.open_store(store_path, wait=True) is not None, widget.status
    everything = dock(viewer, "Segment Everything")
    assert everything.mode == "ais"
    labels = everything.run(scope="stack", wait=True)
    assert labels is not None, everything.status
    assert calls == [] and (labels.data == 1).all()  # flat decoder maps: one object per slice
    assert sorted(p.relative_to(store_path) for p in store_path.rglob("*")) == files_before


def test_cancel_is_honoured_in_every_mode():
    import threading

    image, _ = draw_objects((128, 128), grid=(2, 2), seed=1)
    cancel = threading.Event()
    cancel.set()
    from napari_sam.engine.automatic import run_to_end

    for mode in ("ais", "apg", "amg"):
        segmenter = SamInstanceSegmenter(oracle_with_decoder(), mode, amg={"points_per_side": 4})
        assert run_to_end(segmenter.job(image, cancel=cancel)) is None, mode


@pytest.mark.gui
def test_widget_refuses_parameters_its_fields_cannot_hold(viewer):
    widget = docked(viewer, oracle_with_decoder())
    for name, value in (("center_distance_threshold", 1.7), ("min_size", -5),
                        ("foreground_threshold", 0.375)):
        with pytest.raises(ValueError, match=name):
            widget.set_params(**{name: value})
    widget.set_params(foreground_threshold=0.35)
    assert widget.params["foreground_threshold"] == 0.35


def test_cli_checks_mode_and_parameters_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import tifffile

    from napari_sam.cli import main
    from napari_sam.engine import weights

    def no_download(*args, **kwargs):
        raise AssertionError("a model was fetched")

    monkeypatch.setattr(weights, "download_job", no_download)
    image, _ = draw_objects((64, 64), grid=(2, 2), seed=1)
    tifffile.imwrite(tmp_path / "im.tif", image)
    base = ["everything", str(tmp_path / "im.tif"), "-o", str(tmp_path / "out.tif")]
    assert main([*base, "--model", "vit_b", "--mode", "ais"]) == 2
    assert "vit_b has none" in capsys.readouterr().err
    assert main([*base, "--model", "vit_t_lm", "--center-distance-threshold", "2"]) == 2
    assert "center_distance_threshold" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_cli_store_made_with_explicit_contrast_limits_is_used(tmp_path, monkeypatch, capsys):
    """`embed --contrast-limits` then `everything --store` without them: the store's own
    normalisation is used (a 16-bit stack), no encoder call."""
    import tifffile
    from conftest import patch_build_sam

    from napari_sam.cli import main

    image, truth = draw_objects((100, 120), grid=(2, 2), seed=3)
    stack = (np.stack([image, image]).astype(np.uint16) * 8)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    model = patch_build_sam(monkeypatch, oracle_with_decoder())
    store = tmp_path / "s.zarr"
    assert main(["embed", str(tmp_path / "s.tif"), "--store", str(store), "--model", "vit_t_lm",
                 "--contrast-limits", "0", "2040", "--quiet"]) == 0
    calls = model.encode_calls
    assert main(["everything", str(tmp_path / "s.tif"), "-o", str(tmp_path / "o.tif"), "--model",
                 "vit_t_lm", "--store", str(store), "--quiet"]) == 0, capsys.readouterr().err
    assert model.encode_calls == calls
    assert_recovers(tifffile.imread(tmp_path / "o.tif")[0], truth)


def test_cancel_stops_the_real_decoder_between_its_stages():
    """The AIS decoder is seconds of CPU at 1024²: a cancel acts between its stages, within a
    second, instead of after the whole forward."""
    import threading

    from napari_sam.engine.predictor import ImageEmbedding
    from napari_sam.model import build_model, get_config
    from napari_sam.model.instance_decoder import InstanceDecoder

    model = build_model(get_config("vit_t"))
    model.checkpoint_sha256 = "random"
    model.instance_decoder = InstanceDecoder(256, 1024)
    embedding = ImageEmbedding(torch.randn(1, 256, 64, 64), (1024, 1024), (1024, 1024), model.signature)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    assert predict_decoder_outputs(model, embedding, cancel) is None
    assert time.monotonic() - start < 0.3 + 1.5


def test_cli_help_defaults_are_the_engines():
    """The CLI writes AIS/APG defaults only for --help (its parser must not import torch);
    they must be the engine's, and options left out keep the engine's values."""
    import argparse

    from napari_sam._cli import everything
    from napari_sam.engine.instance_segmentation import AisParameters
    from napari_sam.engine.prompt_generation import ApgParameters

    for name, (_kind, default, _help) in everything.AIS_FLAGS.items():
        assert getattr(AisParameters(), name) == default, name
    for name, (_kind, default, _help) in everything.APG_FLAGS.items():
        assert getattr(ApgParameters(), name) == default, name
    assert everything.MIN_SIZE_DEFAULTS["ais"] == AisParameters().min_size
    assert everything.MIN_SIZE_DEFAULTS["apg"] == ApgParameters().min_size
    parser = argparse.ArgumentParser()
    everything.add_parser(parser.add_subparsers())
    args = parser.parse_args(["everything", "x.tif", "-o", "y.tif", "--foreground-smoothing", "0"])
    options = everything.segmenter_options(args)
    assert options["ais"] == AisParameters(foreground_smoothing=0.0)
    assert options["apg"] == ApgParameters()
