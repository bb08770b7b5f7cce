"""ViT image encoder of SAM (vit_b / vit_l / vit_h), with windowed and global attention.

Parameter names and shapes follow the official checkpoints (``image_encoder.*``).
Attention runs through ``F.scaled_dot_product_attention`` with the decomposed relative
position bias as an additive mask (see :func:`_attention_with_rel_pos`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock
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


# Bound on the transient (chunk, HW, HW) bias tensor of global attention: 64 M values.
_MAX_BIAS_VALUES = 1 << 26


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

    ``bias[(i, j), (m, n)] = <q_ij, Rh[i, m]> + <q_ij, Rw[j, n]>`` is built as an additive
    mask for ``F.scaled_dot_product_attention`` (fused kernel, no separate softmax pass),
    a few heads at a time so the (heads, HW, HW) tensor of global blocks stays bounded.

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
    chunk = max(1, _MAX_BIAS_VALUES // (n * n))
    out = []
    for start in range(0, b, chunk):
        qc = q[start : start + chunk]
        q_grid = qc.reshape(-1, h, w, d)
        bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, table_h)  # (b, H, W, H)
        bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, table_w)  # (b, H, W, W)
        # (b, H, W, H, 1) + (b, H, W, 1, W) -> (b, 1, HW, HW) additive mask
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(-1, 1, n, n)
        out.append(
            F.scaled_dot_product_attention(
                qc[:, None], k[start : start + chunk, None], v[start : start + chunk, None],
                attn_mask=bias.to(qc.dtype), scale=scale,
            )[:, 0]
        )
    return out[0] if len(out) == 1 else torch.cat(out)


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
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("expected input_size (H, W) for relative positions, got None")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, dim = x.shape
        heads = self.num_heads
        # (B, H, W, 3D) -> (3, B, heads, HW, d) -> three (B*heads, HW, d)
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        if x.device.type == "cpu" and q.dtype != torch.float32:
            # CPU low precision: the linear layers carry the speed-up (bf16 matmul ~4.5x),
            # while bf16 attention logits with an additive bias gain little and cost
            # accuracy, so attention itself runs in float32.
            with torch.autocast("cpu", enabled=False):
                out = self._attend(q.float(), k.float(), v.float(), (h, w)).to(q.dtype)
        else:
            out = self._attend(q, k, v, (h, w))
        # (B*heads, HW, d) -> (B, heads, H, W, d) -> (B, H, W, heads*d)
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)

    def _attend(self, q, k, v, size: tuple[int, int]) -> torch.Tensor:
        """(B*heads, HW, d) q, k, v -> (B*heads, HW, d)."""
        if self.use_rel_pos:
            return _attention_with_rel_pos(
                q, k, v, self.rel_pos_h, self.rel_pos_w, size, self.scale
            )
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window, window, C), zero-padding H, W up to multiples.

    Returns the windows and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    # (B, Hp/win, win, Wp/win, win, C) -> (B, Hp/win, Wp/win, win, win, C)
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWindows, win, win, C) -> (B, H, W, C)."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)  # (B, Hp, Wp, C)
    return x[:, :h, :w, :] if (hp > h or wp > w) else x


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
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
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
        return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, S/16, S/16)
