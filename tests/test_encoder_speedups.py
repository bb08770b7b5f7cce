"""The image encoders' speed-ups keep their results: tiled global attention, projections on
unpadded tokens, BatchNorm folded once (TinyViT), low-precision weights cast once."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
from reference_shim import import_segment_anything

from napari_sam.model import image_encoder
from napari_sam.model.image_encoder import (
    Block,
    _attention_with_rel_pos,
    relative_position_table,
)
from napari_sam.model.interrupt import Stopped, stop_when


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def explicit_attention(q, k, v, rel_pos_h, rel_pos_w, size, scale):
    """softmax(scale q k^T + bias) v written out as the SAM paper's formula, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    h, w = size
    b, n, d = q.shape
    table_h = relative_position_table(h, h, rel_pos_h.double())  # (H, H, d)
    table_w = relative_position_table(w, w, rel_pos_w.double())  # (W, W, d)
    q_grid = q.reshape(b, h, w, d)
    bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, table_h)  # (B, H, W, H)
    bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, table_w)  # (B, H, W, W)
    logits = (q * scale) @ k.transpose(1, 2)  # (B, HW, HW)
    logits = logits.view(b, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]
    return logits.view(b, n, n).softmax(-1) @ v


def random_attention_inputs(batch: int, size: tuple[int, int], d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = size[0] * size[1]
    q, k, v = (torch.randn(batch, n, d, generator=g) for _ in range(3))
    rel_pos_h = torch.randn(2 * size[0] - 1, d, generator=g) * 0.5
    rel_pos_w = torch.randn(2 * size[1] - 1, d, generator=g) * 0.5
    return q, k, v, rel_pos_h, rel_pos_w


# tile budgets (values) for a 7 x 5 grid (35 tokens, 1225 bias values per sequence):
# whole mask at once; 2 sequences (tiles of 2, 2, 1); one sequence in bands of 2, 2, 2, 1
# rows; one row at a time
TILE_BUDGETS = [1 << 22, 2 * 1225, 2 * 5 * 35, 1]


@pytest.mark.parametrize("budget", TILE_BUDGETS)
def test_tiled_attention_equals_the_formula(monkeypatch, budget):
    monkeypatch.setattr(image_encoder, "_BIAS_TILE_VALUES", budget)
    size, scale = (7, 5), 8**-0.5
    q, k, v, rh, rw = random_attention_inputs(5, size)
    with torch.inference_mode():
        out = _attention_with_rel_pos(q, k, v, rh, rw, size, scale)
    assert out.shape == q.shape
    assert rel_err(out, explicit_attention(q, k, v, rh, rw, size, scale)) < 1e-6


def test_tiles_of_any_shape_give_the_same_result(monkeypatch):
    size, scale = (9, 6), 0.3
    inputs = random_attention_inputs(3, size, d=4, seed=1)
    results = []
    for budget in (1 << 22, 3 * 6 * 54, 1):
        monkeypatch.setattr(image_encoder, "_BIAS_TILE_VALUES", budget)
        results.append(_attention_with_rel_pos(*inputs, size, scale))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-6)


def test_tiled_attention_keeps_gradients(monkeypatch):
    monkeypatch.setattr(image_encoder, "_BIAS_TILE_VALUES", 2 * 5 * 35)
    size = (7, 5)
    q, k, v, rh, rw = random_attention_inputs(2, size)
    k_ref, rh_ref = k.clone().requires_grad_(True), rh.clone().requires_grad_(True)
    explicit_attention(q, k_ref, v, rh_ref, rw, size, 0.5).square().sum().backward()
    for bias_needs_grad in (True, False):  # the bias (through the table) or only the keys
        k.grad = rh.grad = None
        k.requires_grad_(True)
        rh.requires_grad_(bias_needs_grad)
        _attention_with_rel_pos(q, k, v, rh, rw, size, 0.5).square().sum().backward()
        assert rel_err(k.grad, k_ref.grad) < 1e-5
        assert rh.grad is None or rel_err(rh.grad, rh_ref.grad) < 1e-5


@pytest.mark.parametrize("window", [0, 4, 5])
def test_block_matches_reference_block(window):
    """Windowed blocks whose grid does not split into windows (9 x 11 with windows of 4 or
    5: padded tokens take part as keys) and a global block, against segment_anything's."""
    sa = import_segment_anything()
    from segment_anything.modeling.image_encoder import Block as RefBlock

    grid, dim, heads = (9, 11), 32, 4
    torch.manual_seed(0)
    input_size = grid if window == 0 else (window, window)
    ref = RefBlock(dim, heads, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                   window_size=window, input_size=input_size).eval()
    with torch.no_grad():
        for p in ref.parameters():  # no zero or one left: rel_pos and biases all matter
            p.normal_(0, 0.3)
    ours = Block(dim, heads, 4.0, window, grid).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, *grid, dim)
    with torch.inference_mode():
        assert rel_err(ours(x), ref(x)) < 1e-5
    del sa


def test_a_long_global_block_stops_between_its_heads(monkeypatch):
    """Cancel acts inside a global block (seconds for vit_b on a CPU), not after it."""
    monkeypatch.setattr(image_encoder, "_BIAS_TILE_VALUES", 64 * 64)  # one head per tile
    block = Block(16, 4, 4.0, 0, (8, 8)).eval()
    finished = []
    block.register_forward_hook(lambda *args: finished.append(True))
    checks = []
    with stop_when(lambda: checks.append(1) or len(checks) >= 2), pytest.raises(Stopped):
        block(torch.randn(1, 8, 8, 16))
    assert finished == [] and len(checks) == 2  # stopped after the 2nd of 4 heads


# --- TinyViT: BatchNorm folded into its convs once ----------------------------------------

def small_tiny_vit(seed: int) -> torch.nn.Module:
    from napari_sam.model.tiny_vit import TinyViT

    torch.manual_seed(seed)
    model = TinyViT(img_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                    num_heads=(1, 2, 2, 4), window_sizes=(7, 7, 7, 7), num_classes=0)
    with torch.no_grad():  # BN statistics and affine parameters away from (0, 1)
        for name, t in model.named_parameters():
            t.add_(0.1 * torch.randn_like(t))
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0, 0.3)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model.eval()


def test_folded_batchnorm_follows_new_weights():
    model, other = small_tiny_vit(0), small_tiny_vit(1)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)  # folds and keeps the folded convs
        model.load_state_dict(other.state_dict())
        got = model(x)
        assert torch.equal(got, other(x))


def test_folded_batchnorm_follows_statistics_learnt_in_train_mode():
    from napari_sam.model.tiny_vit import Conv2dBN

    conv = Conv2dBN(4, 6, 3)
    x = torch.randn(2, 4, 9, 9)
    conv.eval()
    with torch.no_grad():
        before = conv(x)
    conv.train()
    with torch.no_grad():
        train_out = conv(x)  # batch statistics, and the running ones updated in place
    torch.testing.assert_close(train_out, conv.bn(conv.c(x)).detach())  # bn again: same batch
    conv.eval()
    with torch.no_grad():
        after = conv(x)
        expected = conv.bn(conv.c(x))  # plain conv then eval-mode BN
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


# --- low-precision weights cast once ------------------------------------------------------

def test_low_precision_weights_are_cast_once_and_follow_the_master_weights():
    from napari_sam.model.common import Linear

    torch.manual_seed(0)
    layer, plain = Linear(16, 8), torch.nn.Linear(16, 8)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16)
    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.dtype == torch.bfloat16 and self.dtype == torch.float32:
            casts.append(self.shape)
        return out

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.Tensor.to = counting_to
        try:
            first = layer(x)
        finally:
            torch.Tensor.to = real_to
    with torch.inference_mode():
        for _ in range(3):  # three more autocast regions, e.g. three more encodes
            with torch.autocast("cpu", dtype=torch.bfloat16):
                again = layer(x)
                assert torch.equal(again, plain(x))  # what autocast alone gives
    assert torch.equal(first, again) and first.dtype == torch.bfloat16
    assert casts == [(8, 16), (8,)]  # weight and bias, once
    cached_weight = layer._cast.get((layer.weight, layer.bias), torch.bfloat16, lambda: None)[0]
    assert cached_weight.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with torch.no_grad():
        layer.weight.mul_(2)  # the fp32 master changes: the cast copy is remade
        plain.weight.mul_(2)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), plain(x))
    with torch.inference_mode():
        assert layer(x).dtype == torch.float32  # outside autocast: the fp32 parameters


def test_bf16_encoder_keeps_float32_parameters_and_its_state_dict(tiny_reference_and_checkpoint):
    from sam_factory import TINY_VIT_B

    from napari_sam import build_sam

    _, path = tiny_reference_and_checkpoint
    model = build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="bf16")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = model.preprocess(torch.rand(1, 3, 200, 256) * 255)
    first = model.encode(x)
    assert torch.equal(model.encode(x), first)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


# --- bf16 fidelity ------------------------------------------------------------------------

def test_bf16_encoder_runs_its_neck_in_float32(tiny_sam):
    """The bf16 neck alone took a random vit_b below the mask bound (see engine/device.py):
    under autocast the neck sees the trunk's output in float32 and returns float32."""
    encoder = tiny_sam.image_encoder
    seen = []
    hook = encoder.neck.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            encoder(torch.randn(1, 3, 256, 256))
    finally:
        hook.remove()
    assert seen == [(torch.float32, torch.float32)]


def test_bf16_masks_keep_the_smallest_iou_bound(tiny_reference_and_checkpoint, tiny_sam):
    """What precision "auto" picks on a CPU with native bf16: every mask (not only the
    mean, as test_parity's) within IoU 0.99 of fp32's."""
    import numpy as np
    from sam_factory import TINY_VIT_B
    from test_parity import PROMPTS

    from napari_sam import SamPredictor, build_sam

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:180, 0:300]
    image = np.stack([(xx * 0.8) % 255, (yy * 1.3) % 255, ((xx + yy) * 0.5) % 255], axis=-1)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    _, path = tiny_reference_and_checkpoint
    fp32 = SamPredictor(tiny_sam)
    fp32.set_image(image)
    with pytest.warns(UserWarning) if not _native_bf16() else contextlib.nullcontext():
        low = SamPredictor(build_sam(TINY_VIT_B, checkpoint=path, device="cpu", precision="bf16"))
    low.set_image(image)
    ious = []
    for prompt in PROMPTS.values():
        kwargs = {k: np.asarray(v) for k, v in prompt.items()}
        for a, b in zip(fp32.predict(**kwargs)[0], low.predict(**kwargs)[0]):
            ious.append(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))
    assert min(ious) >= 0.99, ious


def _native_bf16() -> bool:
    from napari_sam.engine.device import cpu_has_native_bf16

    return cpu_has_native_bf16()
