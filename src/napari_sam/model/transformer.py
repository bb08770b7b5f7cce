"""Two-way transformer of the SAM mask decoder: prompt tokens <-> image tokens.

Image tokens may come with batch size 1 while the prompt tokens have batch B: every
image-side computation that does not depend on the prompt (the first layer's key/value
projections of the image and its query projection) then runs once, not B times, and
broadcasting gives results identical to repeating the image B times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose inner width is ``embedding_dim // downsample_rate``.

    q: (B, Nq, C), k: (B, Nk, C), v: (B, Nk, C) -> (B, Nq, C); batch axes broadcast.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(
                f"expected num_heads to divide {self.internal_dim}, got num_heads={num_heads}"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, N, heads*d) -> (B, heads, N, d)."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention on already projected, head-split tensors (B, heads, N, d) -> (B, Nq, C)."""
        d = q.shape[-1]
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1)
        out = attn @ v  # (B, heads, Nq, d)
        b, heads, nq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, heads * d))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend(
            self.split_heads(self.q_proj(q)),
            self.split_heads(self.k_proj(k)),
            self.split_heads(self.v_proj(v)),
        )


@dataclass
class ImageSideCache:
    """Prompt-independent projections of the first two-way layer for one image.

    ``keys`` and ``key_pe`` are the flattened image tokens and their positional encoding,
    (1, HW, C); the other tensors are (1, heads, HW, d): the image tokens projected by the
    first layer's token->image key/value projections and its image->token query projection.
    """

    keys: Tensor
    key_pe: Tensor
    t2i_keys: Tensor
    t2i_values: Tensor
    i2t_queries: Tensor


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of the tokens, token->image, MLP, image->token (names as in SAM)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def image_side(self, keys: Tensor, key_pe: Tensor) -> ImageSideCache:
        """Projections of image tokens keys/key_pe (1, HW, C) that ignore the prompt."""
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        keys_pe = keys + key_pe
        return ImageSideCache(
            keys=keys,
            key_pe=key_pe,
            t2i_keys=t2i.split_heads(t2i.k_proj(keys_pe)),
            t2i_values=t2i.split_heads(t2i.v_proj(keys)),
            i2t_queries=i2t.split_heads(i2t.q_proj(keys_pe)),
        )

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        cache: ImageSideCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        """queries (B, T, C), keys (B or 1, HW, C) -> updated (B, T, C), (B, HW, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        if cache is None:
            cache = self.image_side(keys, key_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        q = t2i.split_heads(t2i.q_proj(queries + query_pe))
        queries = self.norm2(queries + t2i.attend(q, cache.t2i_keys, cache.t2i_values))

        queries = self.norm3(queries + self.mlp(queries))

        tokens_pe = queries + query_pe
        k = i2t.split_heads(i2t.k_proj(tokens_pe))
        v = i2t.split_heads(i2t.v_proj(queries))
        keys = self.norm4(keys + i2t.attend(cache.i2t_queries, k, v))  # (B, HW, C)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token->image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    @staticmethod
    def flatten_image(image: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, HW, C)."""
        return image.flatten(2).permute(0, 2, 1)

    def image_side(self, image_embedding: Tensor, image_pe: Tensor) -> ImageSideCache:
        """Prompt-independent first-layer work for (1, C, H, W) image tokens (reusable)."""
        return self.layers[0].image_side(
            self.flatten_image(image_embedding), self.flatten_image(image_pe)
        )

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        point_embedding: Tensor,
        cache: ImageSideCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            image_embedding: (B or 1, C, H, W) image tokens (with the dense prompt added);
                unused when ``cache`` is given.
            image_pe: (1, C, H, W) positional encoding of the image grid.
            point_embedding: (B, T, C) prompt and output tokens.
            cache: :meth:`image_side` of the same image_embedding/image_pe, if known.
        Returns:
            tokens (B, T, C) and image tokens (B, HW, C).
        """
        if cache is not None:  # (the flattening was done once for this image)
            keys, key_pe = cache.keys, cache.key_pe
        else:
            keys = self.flatten_image(image_embedding)  # (B or 1, HW, C)
            key_pe = self.flatten_image(image_pe)  # (1, HW, C)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(
                queries, keys, point_embedding, key_pe, cache if i == 0 else None
            )
        q = queries + point_embedding
        queries = queries + self.final_attn_token_to_image(q, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys
