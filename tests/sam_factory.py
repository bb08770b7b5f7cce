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
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
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
