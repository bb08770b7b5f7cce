"""micro-sam's AIS decoder (torch_em UNETR without its encoder) against micro-sam itself.

The reference is micro-sam's own code path: ``get_unetr(image_encoder)`` on a random
reference SAM encoder, every decoder parameter and buffer perturbed, the decoder state
taken as micro-sam exports it (UNETR state entries not under ``encoder``), and
``DecoderAdapter(unetr)(embeddings, input_shape, original_shape)`` as the expected output.
Ours is ``decoder_from_state(state, config)``. Reduced input sizes keep it fast; the
decoder's layer sizes are the real ones (they depend only on the embedding channels).
"""

from __future__ import annotations

import pytest
import torch
from reference_shim import import_mobile_sam, import_segment_anything
from sam_factory import TINY_FAST, TINY_VIT_B, perturb_, reference_sam

from napari_sam.model import MODEL_CONFIGS
from napari_sam.model.checkpoint import CheckpointError
from napari_sam.model.instance_decoder import InstanceDecoder, decoder_from_state

TOLERANCE = 1e-4  # relative error, fp32
# input 128: embedding (256, 8, 8), decoder output 128x128 (the layer sizes are the real ones)
CONFIG = TINY_VIT_B.with_changes(img_size=128)


def import_instance_segmentation():
    import_segment_anything()  # the torchvision shim first
    try:
        from micro_sam import instance_segmentation
        from torch_em.model.unetr import UNETR
    except ImportError as exc:
        pytest.skip(f"micro-sam is not installed (test-only: scripts/setup_env.sh --testing): {exc}")
    return instance_segmentation, UNETR


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_unetr(encoder: torch.nn.Module, transposed: bool, seed: int = 0):
    """micro-sam's AIS UNETR on ``encoder`` with random weights everywhere in the decoder,
    built as micro-sam loads a trained decoder: ``get_unetr(encoder, decoder_state)``."""
    ais, UNETR = import_instance_segmentation()
    trained = UNETR(  # get_unetr's arguments
        backbone="sam",
        encoder=encoder,
        out_channels=3,
        use_sam_stats=True,
        final_activation="Sigmoid",
        use_skip_connection=False,
        resize_input=True,
        use_conv_transpose=transposed,
    )
    for i, (name, module) in enumerate(trained.named_children()):
        if name != "encoder":
            perturb_(module, seed + i)  # one seed per submodule: distinct values everywhere
    unetr = ais.get_unetr(encoder, decoder_state(trained), device="cpu")
    assert unetr.use_conv_transpose == transposed  # micro-sam read the variant from the keys
    return unetr.eval()


def decoder_state(unetr) -> dict[str, torch.Tensor]:
    """The decoder state as micro-sam exports it."""
    return {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder")}


def reference_output(unetr, embeddings, input_size, original_size) -> torch.Tensor:
    ais, _ = import_instance_segmentation()
    with torch.no_grad():
        return ais.DecoderAdapter(unetr)(embeddings, input_size, original_size)


@pytest.fixture(scope="module")
def vit_sam():
    return reference_sam(CONFIG, seed=0)


@pytest.fixture(scope="module")
def vit_encoder(vit_sam):
    return vit_sam.image_encoder


@pytest.fixture(scope="module")
def unetrs(vit_encoder):
    """Reference UNETRs by upsampler kind (True: transposed convolutions)."""
    return {transposed: reference_unetr(vit_encoder, transposed, seed=10) for transposed in (True, False)}


@pytest.fixture(scope="module", params=[True, False], ids=["transposed", "interpolation"])
def unetr(request, unetrs):
    return unetrs[request.param]


@pytest.fixture(scope="module")
def ours(unetr):
    return decoder_from_state(decoder_state(unetr), CONFIG)


def test_state_keys_and_shapes_match_micro_sam(unetr):
    ours = InstanceDecoder(256, CONFIG.img_size, transposed=unetr.use_conv_transpose)
    expected = {k: tuple(v.shape) for k, v in decoder_state(unetr).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


def test_variant_detected_from_keys(unetr, ours):
    assert ours.transposed == unetr.use_conv_transpose
    assert not ours.training


@pytest.mark.parametrize(
    "input_size, original_size, batch",
    [
        ((128, 128), (128, 128), 1),  # no resize: identity path
        ((90, 128), (700, 1000), 2),  # landscape 700x1000: crop rows, then upscale
        ((128, 77), (50, 30), 1),  # portrait: crop columns, then downscale
    ],
)
def test_parity_with_micro_sam(unetr, ours, input_size, original_size, batch):
    embeddings = torch.randn(batch, 256, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = reference_output(unetr, embeddings, input_size, original_size)
    got = ours(embeddings, input_size, original_size)
    assert got.shape == (batch, 3, *original_size) and got.is_contiguous()
    assert rel_err(got, expected) <= TOLERANCE
    # random weights still give non-trivial maps (not saturated sigmoids)
    assert expected.std() > 0.02 and ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5


def test_inputs_not_modified_and_repeatable(ours):
    embeddings = torch.randn(1, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    before = embeddings.clone()
    first = ours(embeddings, (100, 128), (100, 128))
    assert torch.equal(embeddings, before)
    assert torch.equal(ours(embeddings, (100, 128), (100, 128)), first)


def test_new_weights_are_used_after_load_state_dict(unetrs):
    """The merged transposed-conv weights are cached: other weights must refresh them."""
    ours = InstanceDecoder(256, CONFIG.img_size, transposed=True).eval()
    embeddings = torch.randn(1, 256, 8, 8)
    ours(embeddings, (128, 128), (128, 128))  # caches the merged weights of the initial ones
    other = unetrs[True]
    ours.load_state_dict(decoder_state(other))
    expected = reference_output(other, embeddings, (128, 128), (128, 128))
    assert rel_err(ours(embeddings, (128, 128), (128, 128)), expected) <= TOLERANCE


def test_build_sam_reads_micro_sam_ais_checkpoint(tmp_path, vit_sam, unetrs):
    """A checkpoint as micro-sam exports an AIS model: build_sam sets model.instance_decoder."""
    from napari_sam import build_sam

    unetr = unetrs[True]  # the variant is read by decoder_from_state, tested above

    path = tmp_path / "ais_model.pt"
    torch.save({"model_state": vit_sam.state_dict(), "decoder_state": decoder_state(unetr)}, path)
    model = build_sam(CONFIG, checkpoint=path, device="cpu", precision="fp32")
    assert model.instance_decoder.transposed == unetr.use_conv_transpose
    assert not any(k.startswith(("base.", "deconv")) for k in model.state_dict())
    embeddings = torch.randn(1, 256, 8, 8)
    expected = reference_output(unetr, embeddings, (90, 128), (700, 1000))
    got = model.instance_decoder(embeddings, (90, 128), (700, 1000))
    assert rel_err(got, expected) <= TOLERANCE


def test_vit_t_mobile_sam_encoder():
    """vit_t: torch_em sizes the decoder from MobileSAM's neck (256 channels) as for ViTs."""
    import_mobile_sam()
    from mobile_sam.modeling.tiny_vit_sam import TinyViT

    config = MODEL_CONFIGS["vit_t"].with_changes(img_size=128)
    enc = config.encoder
    encoder = TinyViT(
        img_size=config.img_size,
        embed_dims=list(enc.embed_dims),
        depths=list(enc.depths),
        num_heads=list(enc.num_heads),
        window_sizes=list(enc.window_sizes),
        mlp_ratio=enc.mlp_ratio,
        drop_path_rate=0.0,
        layer_lr_decay=0.8,
    )
    unetr = reference_unetr(encoder, transposed=False, seed=30)
    ours = decoder_from_state(decoder_state(unetr), config)
    embeddings = torch.randn(1, 256, 8, 8)
    expected = reference_output(unetr, embeddings, (96, 128), (300, 400))
    assert rel_err(ours(embeddings, (96, 128), (300, 400)), expected) <= TOLERANCE


def test_embedding_channels_follow_the_encoder_neck():
    """A SAM whose neck gives 32 channels: decoder in_channels 32, embedding grid 8."""
    unetr = reference_unetr(reference_sam(TINY_FAST).image_encoder, transposed=False, seed=50)
    ours = decoder_from_state(decoder_state(unetr), TINY_FAST)
    embeddings = torch.randn(1, 32, 8, 8)
    expected = reference_output(unetr, embeddings, (96, 128), (96, 128))
    assert rel_err(ours(embeddings, (96, 128), (96, 128)), expected) <= TOLERANCE
    with pytest.raises(CheckpointError, match=r"wrong shape.*base\.block\.1\.weight"):
        decoder_from_state(decoder_state(unetr), CONFIG)


def test_mismatched_state_raises_checkpoint_error(unetr):
    state = decoder_state(unetr)
    missing = {k: v for k, v in state.items() if not k.startswith("decoder_head.")}
    with pytest.raises(CheckpointError, match=r"'vit_b'.*missing \(4\): decoder_head\.block\.1"):
        decoder_from_state(missing, CONFIG)
    extra = {**state, "decoder.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): decoder\.extra\.weight"):
        decoder_from_state(extra, CONFIG)
    full_sam = {f"image_encoder.{k}": v for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"missing \(\d+\).*unexpected \(\d+\)"):
        decoder_from_state(full_sam, CONFIG)
    with pytest.raises(CheckpointError, match="mapping"):
        decoder_from_state([1, 2], CONFIG)


def test_rejects_bad_inputs():
    decoder = InstanceDecoder(256, 128)
    with pytest.raises(ValueError, match=r"expected image_embeddings.*got \(1, 32, 8, 8\)"):
        decoder(torch.zeros(1, 32, 8, 8), (128, 128), (128, 128))
    with pytest.raises(ValueError, match="expected input_size"):
        decoder(torch.zeros(1, 256, 8, 8), (200, 128), (200, 128))
    with pytest.raises(ValueError, match="expected original_size"):
        decoder(torch.zeros(1, 256, 8, 8), (128, 128), (0, 128))


@pytest.mark.parametrize("grid", [(5, 7), (1, 1), (2, 3)])
def test_merged_transposed_and_3x3_conv_equal_the_two_convs(grid):
    """The merged 2x2 conv, border rows/columns included (big biases make a miss visible)."""
    from napari_sam.model.instance_decoder import _merged_conv_relu, merge_deconv_conv

    gen = torch.Generator().manual_seed(7)
    weight_t, bias_t = torch.randn(6, 5, 2, 2, generator=gen), 5 * torch.randn(5, generator=gen)
    weight, bias = torch.randn(4, 5, 3, 3, generator=gen), torch.randn(4, generator=gen)
    x = torch.randn(2, 6, *grid, generator=gen).contiguous(memory_format=torch.channels_last)
    up = torch.nn.functional.conv_transpose2d(x, weight_t, bias_t, stride=2)
    expected = torch.nn.functional.conv2d(up, weight, bias, padding=1).relu()
    out = torch.empty(2, 2 * grid[0], 2 * grid[1], 4)
    _merged_conv_relu(x, *merge_deconv_conv(weight_t, bias_t, weight, bias), out)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-4)
