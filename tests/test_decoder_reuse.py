"""What the decoder reuses between calls: masks only for confident prompts, and upscaler
weights reshaped once but remade when the weights change."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from napari_sam import SamPredictor
from napari_sam.model.config import build_model


def predictor_with_image(model) -> SamPredictor:
    rng = np.random.default_rng(0)
    predictor = SamPredictor(model)
    predictor.set_image((rng.random((200, 256, 3)) * 255).astype(np.uint8))
    return predictor


@pytest.mark.parametrize("decoder_dtype", [None, torch.bfloat16])
def test_decode_above_gives_the_masks_of_the_confident_prompts(tiny_sam, decoder_dtype):
    """The same prompts as filtering decode's float32 IoU, also with a low-precision decoder
    (its IoU compared in float32, not against the threshold rounded to bf16)."""
    model = copy.deepcopy(tiny_sam)
    model.decoder_dtype = decoder_dtype
    predictor = predictor_with_image(model)
    coords = torch.rand(9, 1, 2, generator=torch.Generator().manual_seed(0)) * 250
    labels = torch.ones(9, 1, dtype=torch.int)
    with torch.inference_mode():
        low_res, iou = predictor.decode_low_res(coords, labels)
        # about half the prompts pass; just below an IoU, which bf16 would round up to it.
        # The IoU as decode_low_res_above computes it: decode_low_res makes its IoU and
        # mask tokens in one batch, which may round the IoU differently in the last bit
        _, _, iou_all = predictor.decode_low_res_above(coords, labels, -1.0)
        median = np.float32(iou_all.max(dim=1).values.median())
        threshold = float(np.nextafter(median, np.float32(-1)))
        rows, kept, iou_above = predictor.decode_low_res_above(coords, labels, threshold)
    expected = (iou_above > threshold).any(dim=1).nonzero()[:, 0]
    assert 0 < len(rows) < 9 and torch.equal(rows, expected) and torch.equal(iou_above, iou_all)
    torch.testing.assert_close(iou_above, iou)
    atol = 1e-5 if decoder_dtype is None else 0.05  # bf16: batch shapes may round differently
    torch.testing.assert_close(kept, low_res[rows], rtol=0, atol=atol)


@pytest.mark.parametrize(("weight", "factor"), [
    ("mask_decoder.output_upscaling.3.weight", -1.0),  # reshaped transposed-conv weights
    ("mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.weight", -1.5),  # image side
])
def test_cached_decoder_work_follows_load_state_dict(tiny_sam, weight, factor):
    """Decoder work is cached (the upscaler's reshaped weights; the per-image first-layer
    projections of the image tokens): new weights loaded after set_image must not decode
    with the old ones."""
    model = copy.deepcopy(tiny_sam)
    predictor = predictor_with_image(model)
    point, label = np.array([[100.0, 80.0]]), np.array([1])
    _, _, before = predictor.predict(point, label)
    state = model.state_dict()
    state[weight] = state[weight] * factor
    model.load_state_dict(state)
    _, _, after = predictor.predict(point, label)
    fresh = SamPredictor(model)
    fresh.set_embedding(predictor.get_embedding())
    _, _, expected = fresh.predict(point, label)
    assert not np.allclose(before, expected)
    np.testing.assert_array_equal(after, expected)


def test_a_model_built_under_inference_mode_predicts(tiny_sam):
    """Its parameters are inference tensors (no version counter to key a cache on)."""
    with torch.inference_mode():
        model = build_model(tiny_sam.config)
        model.load_state_dict(tiny_sam.state_dict())
    point, label = np.array([[100.0, 80.0]]), np.array([1])
    predictor = predictor_with_image(model)
    _, _, first = predictor.predict(point, label)
    _, _, again = predictor.predict(point, label)
    _, _, expected = predictor_with_image(tiny_sam).predict(point, label)
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(again, first)


def test_a_cache_reader_never_pairs_an_old_key_with_a_new_value():
    """A reader interleaved at any line of a writer's update (another thread, between two
    bytecodes) gets the value of its own variant, never the one being stored."""
    import sys

    from napari_sam.model.common import DerivedFromParameters

    derived, weight = DerivedFromParameters(), torch.ones(3)
    assert derived.get((weight,), "fp16", lambda: "fp16 value") == "fp16 value"
    made, seen = [], []

    def make_bf16():
        made.append(True)
        return "bf16 value"

    def reader(frame, event, arg):  # runs a read at every line of the writer's get
        if event == "line" and made:
            seen.append(derived.get((weight,), "fp16", lambda: "fp16 value"))
        return reader

    def tracer(frame, event, arg):
        return reader if frame.f_code is DerivedFromParameters.get.__code__ else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        derived.get((weight,), "bf16", make_bf16)
    finally:
        sys.settrace(previous)
    assert seen and set(seen) == {"fp16 value"}


def test_final_attention_runs_only_for_the_token_rows_read(tiny_sam):
    """The final token->image attention is computed for the IoU token of every prompt and
    the mask tokens asked for of the prompts whose masks are made, never for the point
    tokens (in one pass when every prompt's masks are made), and a row's result is the one
    the full attention gives it."""
    model = copy.deepcopy(tiny_sam)
    predictor = predictor_with_image(model)
    attention = model.mask_decoder.transformer.final_attn_token_to_image
    rows_seen = []
    attention.q_proj.register_forward_hook(lambda m, args, out: rows_seen.append(tuple(args[0].shape[:2])))
    coords = torch.rand(9, 2, 2, generator=torch.Generator().manual_seed(1)) * 250
    labels = torch.ones(9, 2, dtype=torch.int)
    with torch.inference_mode():
        predictor.decode_low_res(coords, labels, multimask_output=True)
        assert rows_seen == [(9, 4)]  # IoU + 3 of 4 mask tokens, of 7 with the 2 points
        rows_seen.clear()
        predictor.decode_low_res(coords, labels, multimask_output=False)
        assert rows_seen == [(9, 2)]
        rows_seen.clear()
        _, iou = predictor.decode_low_res(coords, labels)
        threshold = float(iou.max(dim=1).values.median())
        kept, _, _ = predictor.decode_low_res_above(coords, labels, threshold)
        assert rows_seen == [(9, 4), (9, 1), (len(kept), 3)] and 0 < len(kept) < 9

        transformer = model.mask_decoder.transformer
        queries, keys, key_pe = transformer.two_way_layers(
            None, None, torch.randn(2, 7, transformer.embedding_dim), predictor._image_side_cache()
        )
        tokens = torch.randn_like(queries)
        every_row = transformer.final_tokens(queries, keys, key_pe, tokens)
        some_rows = transformer.final_tokens(queries, keys, key_pe, tokens, [0, 2, 3])
    torch.testing.assert_close(some_rows, every_row[:, [0, 2, 3]], rtol=0, atol=1e-5)


def test_upscaled_masks_are_the_hypernetwork_projection_of_the_upscaling_convs(tiny_sam):
    """The matmul upscaler (both pixel shuffles applied once, to the K projected masks)
    gives the projection of the module's own transposed convs, LayerNorm and GELUs."""
    decoder = tiny_sam.mask_decoder
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(2, 5, 7, decoder.transformer_dim, generator=generator)  # (B, H, W, C)
    hyper_in = torch.randn(2, 3, decoder.transformer_dim // 8, generator=generator)
    with torch.no_grad():
        masks = decoder._upscale_and_project(src, hyper_in)
        upscaled = decoder.output_upscaling(src.permute(0, 3, 1, 2))  # (B, C/8, 4H, 4W)
        expected = (hyper_in @ upscaled.flatten(2)).reshape(2, 3, 20, 28)
    torch.testing.assert_close(masks, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompts", [1, 5])
def test_a_low_precision_decoder_keeps_the_image_tokens_residual_in_float32(tiny_sam, prompts):
    """With a bf16 decoder the matmuls run in bf16, but each two-way layer adds its
    attention output to float32 image tokens: the sum given to the layer's norm is float32
    (rounding the residual stream to bf16 at every layer would lose its precision)."""
    model = copy.deepcopy(tiny_sam)
    model.decoder_dtype = torch.bfloat16
    predictor = predictor_with_image(model)
    seen: list[torch.dtype] = []
    hooks = [
        layer.norm4.register_forward_pre_hook(lambda _module, args: seen.append(args[0].dtype))
        for layer in model.mask_decoder.transformer.layers
    ]
    coords = torch.rand(prompts, 1, 2, generator=torch.Generator().manual_seed(0)) * 250
    try:
        with torch.inference_mode():
            predictor.decode_low_res(coords, torch.ones(prompts, 1, dtype=torch.int))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [torch.float32] * len(model.mask_decoder.transformer.layers)


def test_prepare_decoder_does_the_per_image_work_once_before_the_first_prompt(tiny_sam):
    """prepare_decoder does nothing without an image; with one, the first prompt reuses
    the work it did (the model's image-side work runs once)."""
    model = copy.deepcopy(tiny_sam)
    calls = []
    image_side_cache = model.image_side_cache
    model.image_side_cache = lambda features: calls.append(1) or image_side_cache(features)
    predictor = SamPredictor(model)
    predictor.prepare_decoder()  # no image: nothing to prepare
    assert calls == []
    predictor.set_image((np.random.default_rng(0).random((200, 256, 3)) * 255).astype(np.uint8))
    predictor.prepare_decoder()
    assert calls == [1]
    predictor.predict(np.array([[100.0, 80.0]]), np.array([1]))
    assert calls == [1]


@pytest.mark.parametrize("image_batch", [1, 3])
@pytest.mark.parametrize("with_pe", [False, True])
def test_token_to_image_attention_equals_plain_attention(tiny_sam, image_batch, with_pe):
    """The folded token->image attention (projections folded into the few token rows, the
    positional encoding's logits apart) gives the module's plain attention, also for a
    batch-1 image shared by 3 prompts."""
    attention = tiny_sam.mask_decoder.transformer.final_attn_token_to_image
    gen = torch.Generator().manual_seed(0)
    c = attention.embedding_dim
    tokens = torch.randn(3, 5, c, generator=gen)
    image = torch.randn(image_batch, 64, c, generator=gen)
    pe = torch.randn(1, 64, c, generator=gen) if with_pe else None
    with torch.inference_mode():
        folded = attention.tokens_to_image(tokens, image, image, pe)
        keys = image if pe is None else image + pe
        plain = attention(tokens, keys.expand(3, -1, -1), image.expand(3, -1, -1))
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)


def test_prompts_with_many_points_share_the_image_side(tiny_sam):
    """Batched prompts with enough points that the image->token attention is not folded
    (heads x tokens >= its width) decode as each prompt alone does."""
    predictor = predictor_with_image(copy.deepcopy(tiny_sam))
    attention = tiny_sam.mask_decoder.transformer.layers[0].cross_attn_image_to_token
    points = attention.internal_dim // attention.num_heads  # with the 5 output tokens: not folded
    coords = torch.rand(3, points, 2, generator=torch.Generator().manual_seed(0)) * 250
    labels = torch.ones(3, points, dtype=torch.int)
    with torch.inference_mode():
        masks, iou = predictor.decode_low_res(coords, labels)
        for i in range(3):
            alone_masks, alone_iou = predictor.decode_low_res(coords[i : i + 1], labels[i : i + 1])
            torch.testing.assert_close(masks[i : i + 1], alone_masks, rtol=0, atol=1e-4)
            torch.testing.assert_close(iou[i : i + 1], alone_iou, rtol=0, atol=1e-5)


def test_a_decode_stops_between_its_stages_when_asked(tiny_sam):
    """Under a stop check (``stop_when``) that turns True during a decode, the decode
    raises ``Stopped`` at its next stage, here before the second two-way layer (the widget
    stops a background guess nobody wants this way); without one it decodes as always."""
    from napari_sam.model.interrupt import Stopped, stop_when

    predictor = SamPredictor(tiny_sam)
    predictor.set_image((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    layers = predictor.model.mask_decoder.transformer.layers
    assert len(layers) == 2
    runs = [0, 0]

    def counting(i, forward):
        def counted(*args, **kwargs):
            runs[i] += 1
            return forward(*args, **kwargs)
        return counted

    for i, layer in enumerate(layers):
        layer.forward = counting(i, layer.forward)
    try:
        with stop_when(lambda: runs[0] > 0):  # asked to stop once the first layer ran
            with pytest.raises(Stopped):
                predictor.predict(np.array([[30.0, 20.0]]), np.array([1]))
        assert runs == [1, 0]
        masks, _, _ = predictor.predict(np.array([[30.0, 20.0]]), np.array([1]))
        assert runs == [2, 1] and masks.shape == (3, 64, 80)
    finally:
        for layer in layers:
            del layer.forward
