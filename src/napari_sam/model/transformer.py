"""Two-way transformer of the SAM mask decoder: prompt tokens <-> image tokens.

Image tokens may come with batch size 1 while the prompt tokens have batch B: every
image-side computation that does not depend on the prompt (the first layer's key/value
projections of the image and its query projection) then runs once, not B times, and
broadcasting gives results identical to repeating the image B times.

The final token->image attention treats each token row on its own, so only the rows a
caller reads are computed (:meth:`TwoWayTransformer.final_tokens`): the IoU token for every
prompt, the mask tokens of the masks asked for (three of four when multimask, none of the
point tokens), and only for prompts whose masks are made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import MLPBlock, autocast_dtype
from .interrupt import raise_if_stopped


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
        b, heads, nq, d = q.shape
        if b > 1 and k.shape[0] == 1 and v.shape[0] == 1:
            # one image for B prompts: (heads, B*Nq, d) queries against (heads, Nk, d), so
            # the image's keys and values are not expanded (copied) B times by the matmuls
            q_rows = q.transpose(0, 1).reshape(1, heads, b * nq, d)
            out = self._softmax_attention(q_rows, k, v)[0]  # (heads, B*Nq, d)
            out = out.reshape(heads, b, nq, d).transpose(0, 1)  # (B, heads, Nq, d)
        else:  # batches broadcast: a batch-1 image's queries against B prompts' tokens too
            out = self._softmax_attention(q, k, v)  # (B, heads, Nq, d)
        return self.out_proj(out.transpose(1, 2).reshape(out.shape[0], nq, heads * d))

    @staticmethod
    def _softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) tensors -> (B, heads, Nq, d)."""
        d = q.shape[-1]
        if q.shape[-2] < k.shape[-2]:  # scale the few queries, not the (Nq, Nk) logits
            attn = torch.softmax(q * (1 / math.sqrt(d)) @ k.transpose(-2, -1), dim=-1)
        else:
            attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1)
        return attn @ v  # (B, heads, Nq, d)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend(
            self.split_heads(self.q_proj(q)),
            self.split_heads(self.k_proj(k)),
            self.split_heads(self.v_proj(v)),
        )

    # The image has N = 4096 tokens, a prompt only T ~ 7. Projecting the image tokens
    # costs N*C*internal_dim per projection; folding the projection into the few token
    # vectors instead costs N*C*heads*T, less whenever heads*T < internal_dim. The results
    # are the same up to float rounding (re-associated sums).

    def _fold_pays(self, num_tokens: int) -> bool:
        return self.num_heads * num_tokens < self.internal_dim

    def _head_weights(self, linear: nn.Linear) -> Tensor:
        """(internal, C) weight of a q/k/v projection -> (heads, d, C)."""
        return linear.weight.reshape(self.num_heads, -1, linear.weight.shape[-1])

    def tokens_to_image(
        self, tokens: Tensor, image_k: Tensor, image_v: Tensor, key_pe: Tensor | None = None
    ) -> Tensor:
        """Tokens attend to image tokens: keys ``image_k`` (+ ``key_pe``), values ``image_v``.

        Args:
            tokens: (B, T, C) queries.
            image_k, image_v: (B or 1, N, C) image tokens (batch 1: shared by every prompt).
            key_pe: (1, N, C) positional encoding added to the keys, if any; with a (B, N, C)
                ``image_k`` its key logits are one matmul of all B*h*T folded query rows,
                and the (B, N, C) sum ``image_k + key_pe`` is never made.
        Returns:
            (B, T, C).
        """
        b, t, _ = tokens.shape
        if not self._fold_pays(t):
            return self.forward(tokens, image_k if key_pe is None else image_k + key_pe, image_v)
        heads = self.num_heads
        q = self.split_heads(self.q_proj(tokens))  # (B, h, T, d)
        d = q.shape[-1]
        # <q, Wk x + bk> = <Wk^T q, x> + const per query: the constant cancels in softmax;
        # the softmax scale goes into the few token rows, not the (hT, N) logits
        qk = torch.einsum("bhtd,hdc->bhtc", q * (1 / math.sqrt(d)), self._head_weights(self.k_proj))
        qk = qk.reshape(b, heads * t, -1)  # (B, hT, C) folded query rows
        if key_pe is not None and image_k.shape[0] == b:
            pe_logits = (qk.reshape(1, b * heads * t, -1) @ key_pe.transpose(1, 2)).reshape(b, heads * t, -1)
            logits = torch.baddbmm(pe_logits, qk, image_k.transpose(1, 2))  # (B, hT, N)
        else:  # no encoding, or a batch-1 image: its sum with the encoding is made once
            keys = image_k if key_pe is None else image_k + key_pe  # (B or 1, N, C)
            logits = qk @ keys.transpose(1, 2)  # (B, hT, N)
        attn = torch.softmax(logits, dim=-1)
        # attn @ (x Wv^T + bv) = (attn @ x) Wv^T + bv, as attention rows sum to 1
        mixed = (attn @ image_v).reshape(b, heads, t, -1)  # (B, h, T, C)
        out = torch.einsum("bhtc,hdc->bhtd", mixed, self._head_weights(self.v_proj))
        out = out + self.v_proj.bias.reshape(heads, 1, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, heads * d))

    def image_to_tokens(
        self,
        image_q: Tensor | None,
        tokens_k: Tensor,
        tokens_v: Tensor,
        projected_q: Tensor | None = None,
        residual: Tensor | None = None,
        overwrite_residual: bool = False,
    ) -> Tensor:
        """Image tokens attend to prompt tokens -> (B, N, C), plus ``residual`` if given.

        Args:
            image_q: (B or 1, N, C) image queries (ignored when ``projected_q`` is given).
            tokens_k, tokens_v: (B, T, C).
            projected_q: (1, h, N, d) ``split_heads(q_proj(image_q))`` if already known.
            residual: (B or 1, N, C) added to the result inside its matmul (no extra pass
                over the B x N x C output).
            overwrite_residual: the caller no longer needs ``residual``: without autograd
                the result may be written over it (not copying it into a new output).
        """
        b, t, _ = tokens_k.shape
        if not self._fold_pays(t):
            if projected_q is None:
                out = self.forward(image_q, tokens_k, tokens_v)
            else:
                k = self.split_heads(self.k_proj(tokens_k))
                out = self.attend(projected_q, k, self.split_heads(self.v_proj(tokens_v)))
            return out if residual is None else residual + out
        heads = self.num_heads
        k = self.split_heads(self.k_proj(tokens_k))  # (B, h, T, d)
        d = k.shape[-1]
        k = k * (1 / math.sqrt(d))  # the softmax scale, on the few keys
        # logits laid out (B, h, T, N): the softmax over the T tokens then runs along
        # contiguous rows of N image tokens (a softmax over rows of 7 is slow)
        if projected_q is not None:  # (1, h, N, d): B*T key rows, the image not expanded
            rows = k.transpose(0, 1).reshape(heads, b * t, d)
            logits = rows @ projected_q[0].transpose(-2, -1)  # (h, B*T, N)
            logits = logits.reshape(heads, b, t, -1).transpose(0, 1)  # (B, h, T, N) view
        else:
            kq = torch.einsum("bhtd,hdc->bhtc", k, self._head_weights(self.q_proj))
            bias = torch.einsum("bhtd,hd->bht", k, self.q_proj.bias.reshape(heads, d))
            logits = kq.reshape(b, heads * t, -1) @ image_q.transpose(1, 2)  # (B, hT, N)
            logits = (logits + bias.reshape(b, heads * t, 1)).reshape(b, heads, t, -1)
        attn = torch.softmax(logits, dim=2)  # (B, h, T, N)
        v = self.split_heads(self.v_proj(tokens_v))  # (B, h, T, d)
        # out_proj folded into the values: (h, T) token rows of width C
        w_out = self.out_proj.weight.reshape(-1, heads, d)  # (C, h, d)
        vo = torch.einsum("bhtd,chd->bhtc", v, w_out)  # (B, h, T, C)
        attn = attn.reshape(b, heads * t, -1).transpose(1, 2)  # (B, N, hT)
        # autocast runs baddbmm in its low precision, casting the residual too: the fused
        # form only where it cannot round the (float32) residual image tokens
        fuse = (
            residual is not None
            and residual.dtype == vo.dtype
            and autocast_dtype(residual.device.type) is None
        )
        if not fuse:
            out = torch.baddbmm(self.out_proj.bias, attn, vo.reshape(b, heads * t, -1))  # (B, N, C)
            return out if residual is None else residual + out
        # each head's attention row sums to 1 over the T tokens, so out_proj's bias spread
        # over the heads' value rows adds it once per image token: residual + attention out
        # in one matmul
        vo = (vo + self.out_proj.bias / heads).reshape(b, heads * t, -1)
        if (
            overwrite_residual
            and residual.shape[0] == b
            and not (torch.is_grad_enabled() and (residual.requires_grad or vo.requires_grad))
        ):
            return residual.baddbmm_(attn, vo)  # (B, N, C)
        return torch.baddbmm(residual, attn, vo)  # (B, N, C)


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
        keys_owned: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """queries (B, T, C), keys (B or 1, HW, C) -> updated (B, T, C), (B, HW, C).

        ``keys_owned``: the caller no longer needs ``keys`` (the previous layer's output),
        which may then be overwritten.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        keys_pe = None if cache is not None else keys + key_pe
        if cache is not None:  # image-side projections precomputed for this image
            q = t2i.split_heads(t2i.q_proj(queries + query_pe))
            attn_out = t2i.attend(q, cache.t2i_keys, cache.t2i_values)
        else:
            attn_out = t2i.tokens_to_image(queries + query_pe, keys_pe, keys)
        queries = self.norm2(queries + attn_out)

        queries = self.norm3(queries + self.mlp(queries))

        projected = cache.i2t_queries if cache is not None else None
        keys = i2t.image_to_tokens(
            keys_pe, queries + query_pe, queries, projected, residual=keys, overwrite_residual=keys_owned
        )
        keys = self.norm4(keys)  # (B, HW, C)
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
        # contiguous (HW, C) rows: every prompt adds them to its own image tokens
        return self.layers[0].image_side(
            self.flatten_image(image_embedding).contiguous(), self.flatten_image(image_pe).contiguous()
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
        queries, keys, key_pe = self.two_way_layers(image_embedding, image_pe, point_embedding, cache)
        return self.final_tokens(queries, keys, key_pe, point_embedding), keys

    def two_way_layers(
        self,
        image_embedding: Tensor | None,
        image_pe: Tensor | None,
        point_embedding: Tensor,
        cache: ImageSideCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The two-way layers without the final attention (arguments as :meth:`forward`).

        Returns:
            tokens (B, T, C), image tokens (B, HW, C) and their positional encoding (1, HW, C).
        """
        if cache is not None:  # (the flattening was done once for this image)
            keys, key_pe = cache.keys, cache.key_pe
        else:
            keys = self.flatten_image(image_embedding)  # (B or 1, HW, C)
            key_pe = self.flatten_image(image_pe)  # (1, HW, C)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            raise_if_stopped()  # a stale guess (the widget's decode ahead) stops between layers
            # after the first layer the image tokens are this loop's own: overwritable
            queries, keys = layer(
                queries, keys, point_embedding, key_pe, cache if i == 0 else None, keys_owned=i > 0
            )
        return queries, keys, key_pe

    def final_tokens(
        self,
        queries: Tensor,
        keys: Tensor,
        key_pe: Tensor,
        point_embedding: Tensor,
        rows: list[int] | None = None,
    ) -> Tensor:
        """The final token->image attention and norm for token ``rows`` only (all: None).

        Each token row attends on its own, so a row's result does not depend on which
        other rows are computed.

        Args:
            queries: (B, T, C) tokens from :meth:`two_way_layers`; point_embedding (B, T, C).
            keys: (B, HW, C) image tokens; key_pe (1, HW, C).
        Returns:
            (B, R, C) tokens for the R rows.
        """
        if rows is not None:
            queries, point_embedding = queries[:, rows], point_embedding[:, rows]
        attention = self.final_attn_token_to_image
        queries = queries + attention.tokens_to_image(queries + point_embedding, keys, keys, key_pe)
        return self.norm_final_attn(queries)
