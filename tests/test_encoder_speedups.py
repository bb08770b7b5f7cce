"""The image encoders' speed-ups keep their results: tiled global attention, projections on
unpadded tokens, BatchNorm folded once (TinyViT), low-precision weights cast once."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from reference_shim import import_segment_anything

from napari_sam.model import image_encoder
from napari_sam.model.image_encoder import Block, _attention_with_rel_pos, relative_position_table
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
    rh.requires_grad_(True)
    q.requires_grad_(True)
    _attention_with_rel_pos(q, k, v, rh, rw, size, 0.5).square().sum().backward()
    q_ref, rh_ref = q.detach().clone().requires_grad_(True), rh.detach().clone().requires_grad_(True)
    explicit_attention(q_ref, k, v, rh_ref, rw, size, 0.5).square().sum().backward()
    assert rel_err(q.grad, q_ref.grad) < 1e-5 and rel_err(rh.grad, rh_ref.grad) < 1e-5


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
