"""Prompt encoder: points, boxes and a low-res mask -> sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2D positions with a fixed random Gaussian frequency matrix.

    The buffer ``positional_encoding_gaussian_matrix`` (2, F) comes from the checkpoint.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords01: torch.Tensor) -> torch.Tensor:
        """coords01: (..., 2) in [0, 1], (x, y) -> (..., 2F) [sin | cos]."""
        proj = (2 * coords01 - 1) @ self.positional_encoding_gaussian_matrix  # (..., F)
        proj = 2 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (H, W) grid -> (2F, H, W)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_xy: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """coords_xy: (B, N, 2) pixels in an (H, W) image -> (B, N, 2F)."""
        h, w = image_size
        scale = torch.tensor([1.0 / w, 1.0 / h], device=coords_xy.device)
        return self._encode(coords_xy.float() * scale)


class PromptEncoder(nn.Module):
    """Encodes SAM prompts.

    Args:
        embed_dim: token width (256).
        image_embedding_size: (He, We) of the image embedding (64, 64).
        input_image_size: (S, S) of the padded model input (1024, 1024).
        mask_in_chans: hidden channels of the mask downscaler (16).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, C, He, We)."""
        return self.pe_layer(self.image_embedding_size)[None]

    def _embed_points(
        self, points_xy: torch.Tensor, labels: torch.Tensor, pad: bool
    ) -> torch.Tensor:
        """points_xy (B, N, 2), labels (B, N) in {-1, 0, 1} -> (B, N(+1), C)."""
        points_xy = points_xy + 0.5  # pixel centres
        if pad:  # without a box, a "not a point" token stands in its place
            b = points_xy.shape[0]
            points_xy = torch.cat([points_xy, points_xy.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points_xy, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """boxes_xyxy (B, 4) -> (B, 2, C): one token per corner."""
        corners = (boxes_xyxy + 0.5).reshape(-1, 2, 2)  # (B, 2 corners, (x, y))
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + corner_types  # (B, 2, C)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts; any of them may be None.

        Args:
            points: ((B, N, 2) coords (x, y) in input pixels, (B, N) labels).
            boxes: (B, 4) xyxy in input pixels.
            masks: (B, 1, 4He, 4We) mask logits.
        Returns:
            sparse (B, T, C) tokens, dense (B, C, He, We).
        """
        if points is not None:
            b = points[0].shape[0]
        elif boxes is not None:
            b = boxes.shape[0]
        elif masks is not None:
            b = masks.shape[0]
        else:
            b = 1
        device = self.no_mask_embed.weight.device
        tokens = [torch.empty((b, 0, self.embed_dim), device=device)]
        if points is not None:
            tokens.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            he, we = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, he, we)
        return sparse, dense
