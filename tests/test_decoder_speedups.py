"""The mask decoder's faster layouts give the plain computation's results, in every
precision and with autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from napari_sam.model.mask_decoder import _interleave_subpixels


@pytest.mark.parametrize(
    ("dtype", "requires_grad"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
     (torch.float64, False), (torch.float32, True)],
)
def test_subpixel_interleave_puts_each_value_at_its_output_pixel(dtype, requires_grad):
    """Value (k, h, w, y1, x1, y2, x2) lands at output pixel (4h + 2 y1 + y2, 4w + 2 x1 +
    x2) of mask k, bit for bit (the pairs moved as wider elements included)."""
    masks = torch.randn(2, 3, 5, 7, 2, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    masks = masks.to(dtype).requires_grad_(requires_grad)
    out = _interleave_subpixels(masks)
    assert out.shape == (2, 3, 20, 28) and out.dtype == dtype
    for h, w, y1, x1, y2, x2 in [(0, 0, 0, 0, 0, 1), (4, 6, 1, 1, 1, 1), (2, 3, 1, 0, 0, 1)]:
        assert torch.equal(out[:, :, 4 * h + 2 * y1 + y2, 4 * w + 2 * x1 + x2], masks[:, :, h, w, y1, x1, y2, x2])
    expected = masks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(2, 3, 20, 28)
    assert torch.equal(out, expected)
    if requires_grad:
        out.sum().backward()
        assert torch.equal(masks.grad, torch.ones_like(masks))


def test_decoder_trains_with_the_fast_paths(tiny_sam):
    """With parameters that require grad the decoder gives the inference masks and IoU and
    gradients reach the upscaler and the final attention."""
    decoder = copy.deepcopy(tiny_sam.mask_decoder).train()
    c = decoder.transformer_dim
    gen = torch.Generator().manual_seed(0)
    image, pe, dense = (torch.randn(1, c, 8, 8, generator=gen) for _ in range(3))
    sparse = torch.randn(1, 3, c, generator=gen)
    masks, iou = decoder(image, pe, sparse, dense, multimask_output=True)
    (masks.sum() + iou.sum()).backward()
    assert decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    assert decoder.transformer.final_attn_token_to_image.q_proj.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        expected_masks, expected_iou = decoder(image, pe, sparse, dense, multimask_output=True)
    torch.testing.assert_close(masks.detach(), expected_masks, rtol=0, atol=1e-5)
    torch.testing.assert_close(iou.detach(), expected_iou, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompts", [1, 2])
@pytest.mark.parametrize("cached", [False, True])
def test_decoding_leaves_the_image_tokens_it_was_given_unchanged(tiny_sam, cached, prompts):
    """Later layers write over their own image tokens (no copy), never over the caller's
    embedding or the per-image cache: decoding the same prompt again gives the same masks."""
    decoder = tiny_sam.mask_decoder
    c = decoder.transformer_dim
    gen = torch.Generator().manual_seed(0)
    image, pe = torch.randn(1, c, 8, 8, generator=gen), torch.randn(1, c, 8, 8, generator=gen)
    dense = torch.zeros(1, c, 8, 8)
    sparse = torch.randn(prompts, 3, c, generator=gen)
    with torch.inference_mode():
        cache = decoder.transformer.image_side(image + dense, pe) if cached else None
        kept = [t.clone() for t in (image, pe, *(vars(cache).values() if cached else ()))]
        first = decoder(image, pe, sparse, dense, multimask_output=True, cache=cache)
        again = decoder(image, pe, sparse, dense, multimask_output=True, cache=cache)
        after = (image, pe, *(vars(cache).values() if cached else ()))
    assert all(torch.equal(a, b) for a, b in zip(after, kept, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
