"""ViT image encoder of SAM (vit_b / vit_l / vit_h), with windowed and global attention.

Parameter names and shapes follow the official checkpoints (``image_encoder.*``).
Attention runs through ``F.scaled_dot_product_attention`` with the decomposed relative
position bias as an additive mask, built one cache-sized tile at a time (see
:func:`_attention_with_rel_pos`); windowed blocks project only the real tokens (see
:meth:`Attention.forward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, Linear, MLPBlock, autocast_dtype
from .interrupt import raise_if_stopped


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) image -> (B, H/p, W/p, D) patch tokens (channels last)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, D)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings for every (query, key) offset along one axis.

    Args:
        q_size, k_size: number of query / key positions on the axis.
        rel_pos: (L, C) learned table, L = 2 * max(q_size, k_size) - 1 normally; another
            length is linearly resampled (as when a model runs at another resolution).
    Returns:
        (q_size, k_size, C) table indexed by (query position, key position).
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        # (L, C) -> (1, C, L) -> resampled (1, C, max_dist) -> (max_dist, C)
        rel_pos = F.interpolate(rel_pos.t()[None], size=max_dist, mode="linear")[0].t()
    q_pos = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_pos = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offset = (q_pos - k_pos) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offset.long()]


# Size of one tile of the additive bias of attention, in values (16 MiB in float32). The
# bias of a global vit_b block is (12 heads, 4096, 4096): 800 MB if built whole, written
# once and read once by the attention kernel. Built one tile at a time into one reused
# buffer, it stays in the last-level cache between being written and being read.
_BIAS_TILE_VALUES = 1 << 22


def _bias_tile_shape(batch: int, h: int, w: int) -> tuple[int, int]:
    """(sequences, grid rows) per tile of the (batch, H*W, H*W) bias (see _BIAS_TILE_VALUES).

    Whole sequences while they fit (windowed blocks: many small ones at once), else one
    sequence and as many query rows of the token grid as fit (global blocks)."""
    n = h * w
    if n * n <= _BIAS_TILE_VALUES:
        return min(batch, _BIAS_TILE_VALUES // (n * n)), h
    return 1, max(1, min(h, _BIAS_TILE_VALUES // (w * n)))


def _attention_with_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v with SAM's decomposed relative-position bias.

    ``bias[(i, j), (m, n)] = <q_ij, Rh[i, m]> + <q_ij, Rw[j, n]>`` is the additive mask of
    ``F.scaled_dot_product_attention`` (fused kernel, no separate softmax pass). It is
    built tile by tile — a few sequences, or one sequence and a band of query rows — so
    that the (B, HW, HW) tensor of a global block never exists whole; each query row's
    result is the same as with the whole mask. A stop request (see ``interrupt``) is
    honoured between tiles.

    Args:
        q, k, v: (B, HW, d) per-head tokens, row-major over (H, W).
        rel_pos_h: (2H-1, d), rel_pos_w: (2W-1, d) learned tables.
        size: (H, W) of the token grid.
    Returns:
        (B, HW, d)
    """
    h, w = size
    b, n, d = q.shape
    table_h = relative_position_table(h, h, rel_pos_h).to(q.dtype)  # (H, H, d)
    table_w = relative_position_table(w, w, rel_pos_w).to(q.dtype)  # (W, W, d)
    q_grid = q.reshape(b, h, w, d)
    bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, table_h)  # (B, H, W, H) over key rows
    bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, table_w)  # (B, H, W, W) over key cols
    seqs, rows = _bias_tile_shape(b, h, w)
    # autograd keeps each tile's mask (and cannot differentiate out= writes): with it on,
    # each tile is a fresh tensor
    reuse = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias_h)))
    buffer = q.new_empty(seqs * rows * w * n) if reuse else None
    q4, k4, v4 = q[:, None], k[:, None], v[:, None]  # (B, 1, HW, d): one "head" per sequence
    out = q.new_empty(b, n, d)
    for s0 in range(0, b, seqs):
        s1 = min(b, s0 + seqs)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            # (s, r, W, H, 1) + (s, r, W, 1, W) -> (s, r, W, H, W): bias of r*W query tokens
            tile_h = bias_h[s0:s1, r0:r1, :, :, None]
            tile_w = bias_w[s0:s1, r0:r1, :, None, :]
            if reuse:
                mask = buffer[: (s1 - s0) * (r1 - r0) * w * n].view(s1 - s0, r1 - r0, w, h, w)
                torch.add(tile_h, tile_w, out=mask)
            else:
                mask = tile_h + tile_w
            queries = slice(r0 * w, r1 * w)
            out[s0:s1, queries] = F.scaled_dot_product_attention(
                q4[s0:s1, :, queries], k4[s0:s1], v4[s0:s1],
                attn_mask=mask.view(s1 - s0, 1, (r1 - r0) * w, n), scale=scale,
            )[:, 0]  # (s, r*W, d)
        raise_if_stopped()  # a global block is seconds on a CPU: stop between sequences
    return out


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative positions: (B, H, W, D) -> same."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("expected input_size (H, W) for relative positions, got None")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """(B, H, W, D) -> (B, H, W, D).

        ``window`` > 0: attention within ``window`` x ``window`` tiles of the grid
        zero-padded to multiples of ``window``, as SAM's windowed blocks (whose padding
        tokens take part as keys). The q/k/v and output projections run on the real tokens
        only: a zero token's q/k/v is the qkv bias, written into the padding directly.
        """
        b, h, w, dim = x.shape
        heads = self.num_heads
        qkv = self.qkv(x)  # (B, H, W, 3D)
        win_h, win_w = (window, window) if window > 0 else (h, w)
        qkv = _pad_with(qkv, (win_h, win_w), self.qkv.bias)  # (B, Hp, Wp, 3D)
        hp, wp = qkv.shape[1], qkv.shape[2]
        nh, nw = hp // win_h, wp // win_w
        # (B, nh, win_h, nw, win_w, 3, heads, d) -> (3, B, nh, nw, heads, win_h, win_w, d)
        # -> three (B*nh*nw*heads, win_h*win_w, d): windows and heads split in one copy
        qkv = qkv.view(b, nh, win_h, nw, win_w, 3, heads, -1).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, b * nh * nw * heads, win_h * win_w, -1).unbind(0)
        if x.device.type == "cpu" and q.dtype != torch.float32:
            # CPU low precision: the linear layers carry the speed-up (bf16 matmul ~4.5x),
            # while bf16 attention logits with an additive bias gain little and cost
            # accuracy, so attention itself runs in float32.
            with torch.autocast("cpu", enabled=False):
                out = self._attend(q.float(), k.float(), v.float(), (win_h, win_w)).to(q.dtype)
        else:
            out = self._attend(q, k, v, (win_h, win_w))
        # (B, nh, nw, heads, win_h, win_w, d) -> (B, nh, win_h, nw, win_w, heads, d) -> (B, Hp, Wp, D)
        out = out.view(b, nh, nw, heads, win_h, win_w, -1).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, hp, wp, dim)
        return self.proj(out[:, :h, :w] if (hp, wp) != (h, w) else out)

    def _attend(self, q, k, v, size: tuple[int, int]) -> torch.Tensor:
        """(B*heads, HW, d) q, k, v -> (B*heads, HW, d)."""
        if self.use_rel_pos:
            return _attention_with_rel_pos(
                q, k, v, self.rel_pos_h, self.rel_pos_w, size, self.scale
            )
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


def _pad_with(x: torch.Tensor, window: tuple[int, int], fill: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W, C) -> (B, Hp, Wp, C) padded at the bottom and right up to multiples of
    ``window`` (rows, cols) with the (C,) vector ``fill`` (None: zeros); ``x`` itself when
    no padding is needed."""
    b, h, w, c = x.shape
    hp, wp = h + (-h) % window[0], w + (-w) % window[1]
    if (hp, wp) == (h, w):
        return x
    out = x.new_empty(b, hp, wp, c)
    fill = x.new_zeros(c) if fill is None else fill.to(x.dtype)
    out[:, h:] = fill
    out[:, :h, w:] = fill
    out[:, :h, :w] = x
    return out


class Block(nn.Module):
    """Pre-norm transformer block, windowed (window > 0) or global: (B, H, W, D) -> same."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.window_size)
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM's ViT encoder: (B, 3, S, S) normalised image -> (B, out_chans, S/16, S/16).

    ``S`` is ``img_size`` (1024 for the official models).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # (B, S/16, S/16, D)
        for block in self.blocks:
            x = block(x)
            raise_if_stopped()  # cancel acts between blocks (~0.5 s each for vit_b on a CPU)
        x = x.permute(0, 3, 1, 2)  # (B, D, S/16, S/16)
        if autocast_dtype(x.device.type) is None:
            return self.neck(x)  # (B, out_chans, S/16, S/16)
        # Low precision: the neck runs in float32 (~1% of the FLOPs). Its bf16 3x3 conv and
        # LayerNorms alone took a random vit_b's smallest mask IoU against fp32 from 0.991
        # to 0.987, below the parity bound (notebook prompts; see engine/device.py).
        with torch.autocast(x.device.type, enabled=False):
            return self.neck(x.float())  # (B, out_chans, S/16, S/16)
