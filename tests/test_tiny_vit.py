"""TinyViT (MobileSAM vit_t encoder): checkpoint compatibility and parity with mobile_sam."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference_shim import import_mobile_sam  # noqa: E402

from napari_sam.model.tiny_vit import TinyViT, relative_offset_index  # noqa: E402

# Reduced configs the reference can also build. Its patch merging picks stride 1 only when
# the output width is 320, 448 or 576, so the last stage keeps 320 channels.
SMALL = dict(
    img_size=128,
    embed_dims=(16, 32, 64, 320),
    depths=(2, 2, 2, 2),
    num_heads=(1, 1, 2, 10),
    window_sizes=(7, 7, 14, 7),  # at 128: grids 16, 8, 8 -> every stage pads its windows
    num_classes=10,
)
# grids 16, 8, 8 split exactly: 2x2 windows, one 8x8 window, 2x2 windows
SMALL_EXACT = dict(SMALL, window_sizes=(7, 8, 8, 4), depths=(1, 1, 2, 1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_tiny_vit(**config) -> torch.nn.Module:
    """mobile_sam's TinyViT built as ``build_sam_vit_t`` does, with ``config`` overrides."""
    import_mobile_sam()
    from mobile_sam.modeling.tiny_vit_sam import TinyViT as RefTinyViT

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    config.setdefault("in_chans", 3)
    return RefTinyViT(drop_path_rate=0.0, layer_lr_decay=0.8, **config)


def reference_forward(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's forward, but with the real final grid (its own hard-codes 64 x 64)."""
    B, _, H, W = x.shape
    tokens = ref.patch_embed(x)  # (B, D0, H/4, W/4)
    for layer in ref.layers:
        tokens = layer(tokens)  # ... -> (B, H/16 * W/16, D3)
    # (B, L, D3) -> (B, H/16, W/16, D3) -> (B, D3, H/16, W/16)
    grid = tokens.view(B, H // 16, W // 16, -1).permute(0, 3, 1, 2)
    return ref.neck(grid)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every floating parameter and buffer off its initial value (fixed seed).

    BN running variances become U(0.5, 1.5); attention biases (initialised to 0) get N(0, 1);
    other vectors (biases, norm weights initialised to 0 or 1, running means) get N(0, 0.2^2)
    added; matrices get noise of their own spread added.
    """
    gen = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in named:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("attention_biases"):
                t.copy_(noise)
            elif t.ndim == 1:
                t.add_(0.2 * noise)
            else:
                t.add_(noise * max(float(t.std()), 0.02))


def twin_models(config: dict, seed: int = 0) -> tuple[torch.nn.Module, TinyViT]:
    """(reference, ours), eval mode, with the same perturbed weights."""
    ref = reference_tiny_vit(**config)
    perturb_(ref, seed)
    # the reference caches its attention bias matrices when switched to eval: do it after
    # the weights are final
    ref.eval()
    ours = TinyViT(**config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def test_state_dict_matches_official_vit_t():
    mobile_sam = import_mobile_sam()
    ref = mobile_sam.sam_model_registry["vit_t"]().image_encoder
    ours = TinyViT()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for key, value in ref_sd.items():
        assert our_sd[key].shape == value.shape, key
        assert our_sd[key].dtype == value.dtype, key
    # same buffers, and those outside the state dict stay outside (mobile_sam's eval-time
    # ``ab`` cache is not one of ours: it is never saved either)
    ref_buffers = {k for k, _ in ref.named_buffers() if not k.endswith(".ab")}
    assert {k for k, _ in ours.named_buffers()} == ref_buffers
    ours.load_state_dict(ref_sd, strict=True)
    assert ours.img_size == 1024


@pytest.mark.parametrize("window_size", [4, 7, 14])
def test_relative_offset_index_matches_reference(window_size):
    import_mobile_sam()
    from mobile_sam.modeling.tiny_vit_sam import Attention

    ref = Attention(8, 8, num_heads=1, attn_ratio=1, resolution=(window_size, window_size))
    assert torch.equal(relative_offset_index(window_size), ref.attention_bias_idxs)
    assert ref.attention_biases.shape == (1, window_size * window_size)


@pytest.mark.parametrize("config", [SMALL, SMALL_EXACT], ids=["padded", "exact"])
def test_parity_small(config):
    ref, ours = twin_models(config)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_forward(ref, x)
        got = ours(x)
    assert got.shape == (2, 256, 8, 8)
    assert got.is_contiguous()
    assert rel_err(got, expected) <= 1e-4


def test_grad_mode_matches_no_grad_mode():
    """The in-place shortcuts taken without autograd change nothing."""
    _, ours = twin_models(SMALL_EXACT)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = ours(x)
    slow = ours(x)
    assert torch.allclose(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    slow.sum().backward()  # the autograd path is a real one
    assert ours.layers[1].blocks[0].attn.attention_biases.grad is not None


def test_train_mode_matches_reference():
    """Outside eval mode BN is not folded: batch statistics, as in the reference."""
    ref, ours = twin_models(SMALL_EXACT)
    ref.train()
    ours.train()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(x), reference_forward(ref, x)) <= 1e-4


def test_bf16_autocast_runs():
    _, ours = twin_models(SMALL)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        full = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x)
    assert low.shape == full.shape
    assert torch.isfinite(low).all()
    assert rel_err(low, full) < 0.05


def test_other_input_sizes():
    """Any H, W that are multiples of 16 work (windows are fixed-size), even non-square."""
    ours = TinyViT(**SMALL_EXACT).eval()
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 96, 160)).shape == (1, 256, 6, 10)


def test_rejects_bad_input():
    ours = TinyViT(**SMALL_EXACT).eval()
    with pytest.raises(ValueError, match="expected"):
        ours(torch.zeros(1, 3, 120, 128))
    with pytest.raises(ValueError, match="expected"):
        ours(torch.zeros(1, 1, 128, 128))
    with pytest.raises(ValueError, match="expected 4 stages"):
        TinyViT(
            embed_dims=(64, 128, 320),
            depths=(2, 2, 2),
            num_heads=(2, 4, 10),
            window_sizes=(7, 7, 7),
        )


@pytest.mark.slow
def test_parity_full_size():
    full = dict(
        img_size=1024,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        num_classes=1000,
    )
    ref, ours = twin_models(full, seed=5)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = ref(x)  # the reference's own forward works at 1024
        got = ours(x)
    assert got.shape == (1, 256, 64, 64)
    assert rel_err(got, expected) <= 1e-4
