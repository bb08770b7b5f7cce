"""Reference SAM models with random weights, saved as checkpoint files, for parity tests.

Every floating-point parameter and buffer is perturbed (including those initialised to
zeros and ones) so that a wrong key mapping or a skipped bias cannot go unnoticed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from reference_shim import import_segment_anything
from napari_sam.model import SamConfig, ViTConfig

# Reduced sizes for the fast tier: same architecture, ~1/50 of the compute of vit_b.
TINY_VIT_B = SamConfig(
    "vit_b",
    "vit",
    ViTConfig(embed_dim=96, depth=2, num_heads=4, global_attn_indexes=(1,)),
    img_size=256,
)


def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every float tensor of ``module`` by random values (positive for norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            elif tensor.dim() == 1 and ("norm" in name or name.endswith(("weight", "bias"))):
                # norms/biases: around their init, with a clearly non-trivial spread
                tensor.add_(0.2 * noise)
            else:
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
                tensor.copy_(noise / max(fan_in, 1) ** 0.5)
    return module


def reference_sam(config: SamConfig, seed: int = 0):
    """The reference ``segment_anything`` Sam for a ViT ``config``, random weights, eval."""
    sa = import_segment_anything()
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    enc = config.encoder
    grid = config.img_size // 16
    dim = config.prompt_embed_dim
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=config.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=enc.global_attn_indexes,
            window_size=14,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    del sa
    return perturb_(model, seed).eval()


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model.state_dict()`` the way the official files are stored."""
    torch.save(model.state_dict(), path)
    return path


# The full 1024 input (64x64 embedding, 256x256 low-res masks, as the official models: what
# client code that hard-codes those sizes needs, e.g. micro-sam's mask prompts) with a
# reduced encoder.
TINY_VIT_B_1024 = SamConfig(
    "vit_b",
    "vit",
    ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)),
    img_size=1024,
)


# Reduced input, encoder *and* decoder (input 128, decoder width 32 instead of 256): for
# client code that decodes a whole point grid (automatic mask generation with its default
# 32x32 points, where the reference upsamples every candidate mask to the input size).
TINY_FAST = SamConfig(
    "vit_b",
    "vit",
    ViTConfig(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,)),
    img_size=128,
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    decoder_heads=2,
)


def decisive_(model: torch.nn.Module) -> torch.nn.Module:
    """Make a random reference Sam give masks that pass the automatic mask generator's
    default filters, so that client code run with default parameters has output to compare.

    Random weights give low, flat logits (stability scores far below 0.95) and predicted
    IoUs around 0: the mask logits are scaled by 1000 (stability ~0.97), the predicted IoU
    is shifted to straddle 0.88, and the positional encoding is made sharper so that
    different points give different masks. Apply before saving the checkpoint.
    """
    decoder = model.mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(1000.0)
            mlp.layers[-1].bias.mul_(1000.0)
        decoder.iou_prediction_head.layers[-1].bias.add_(0.55)
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(3.0)
    return model
