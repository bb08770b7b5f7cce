"""SAM mask decoder: image embedding + prompt tokens -> mask logits and IoU scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import MLP, LayerNorm2d
from .transformer import ImageSideCache, TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks per prompt with their IoU.

    Names match the official checkpoints (``mask_decoder.*``).
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        cache: ImageSideCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            image_embeddings: (1, C, He, We) embedding of one image.
            image_pe: (1, C, He, We) positional encoding.
            sparse_prompt_embeddings: (B, T, C) point/box tokens.
            dense_prompt_embeddings: (B, C, He, We), or (1, C, He, We) when it is the same
                for every prompt (no mask input): the image side is then shared.
            multimask_output: three masks (True) or the single-output mask (False).
            cache: ``transformer.image_side(image_embeddings + dense, image_pe)`` when the
                dense embedding is shared; saves the prompt-independent first-layer work.
        Returns:
            masks (B, 3 or 1, 4He, 4We) logits, iou_pred (B, 3 or 1).
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens[None].expand(b, -1, -1)  # (B, 1 + M, C)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)  # (B, T', C)

        src = image_embeddings + dense_prompt_embeddings  # (B or 1, C, He, We)
        _, c, h, w = src.shape
        hs, src_tokens = self.transformer(src, image_pe, tokens, cache)  # src_tokens (B, HW, C)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # (B, M, C)

        src_img = src_tokens.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src_img)  # (B, C/8, 4He, 4We)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, M, C/8)
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M)

        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]
