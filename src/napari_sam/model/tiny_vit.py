"""TinyViT image encoder of MobileSAM (vit_t): (B, 3, S, S) -> (B, 256, S/16, S/16).

Parameter and buffer names and shapes follow MobileSAM's checkpoint (the ``image_encoder.*``
entries of ``mobile_sam.pt``), so it loads with a strict ``load_state_dict``; that includes
the classification head (``norm_head``, ``head``) which the encoder never uses.

Layout of the network (S = img_size, dims D0..D3 = embed_dims):

- ``patch_embed``: two stride-2 3x3 conv+BN, GELU between -> (B, D0, S/4, S/4).
- ``layers.0``: MBConv blocks (inverted residual, depthwise 3x3), then a patch merging to
  (S/8, S/8, D1).
- ``layers.1..3``: TinyViT blocks (windowed attention with a learned relative-position bias,
  depthwise 3x3 "local conv", MLP), each stage but the last ending with a patch merging.
  Merging halves the grid, except the one into the last stage (stride 1): stages 2 and 3
  both run at S/16.
- ``neck``: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d -> (B, out_chans, S/16, S/16).

Implementation notes (inference only; no drop-path or checkpointing):

- Everything runs in channels-last memory: the input is converted once, the conv stages keep
  it, and the tokens of the attention stages are (B, H, W, C) tensors that the convolutions
  see through a permuted view (a channels-last (B, C, H, W) tensor), without a copy.
- In eval mode every conv+BN pair is run as one convolution whose weight and bias are the
  BN-folded ones (mathematically the same as conv followed by BN in eval mode; the module
  keeps the separate ``c``/``bn`` names). With autograd off they are folded once (and cast
  once under autocast) and reused until the parameters or statistics change.
- Attention runs through ``F.scaled_dot_product_attention`` with the bias as a float mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import DerivedFromParameters, LayerNorm2d, Linear, autocast_dtype
from .interrupt import raise_if_stopped


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, in place when autograd is off.

    Writing into an existing tensor avoids fresh allocations, whose page faults cost more
    than the arithmetic for the large activations of the first stages.
    """
    return F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)


def _add_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, written into ``x`` when autograd is off (``x`` must be a temporary)."""
    return x + y if torch.is_grad_enabled() else x.add_(y)


class Conv2dBN(nn.Module):
    """Conv2d without bias followed by BatchNorm2d: (B, C_in, H, W) -> (B, C_out, H/s, W/s).

    Submodules ``c`` and ``bn`` as in the checkpoint. Padding is ``kernel_size // 2``.
    """

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        self.pointwise = kernel_size == 1 and stride == 1 and groups == 1
        self._cache = DerivedFromParameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # the BN kernel updates its running statistics without bumping their versions
            self._cache.clear()
            return self.bn(self.c(x))
        weight, bias = self._folded(x.device.type)
        if self.pointwise:
            # a 1x1 conv is a matmul over channels: (B, C_in, H, W) -> (B, H, W, C_in) view of
            # the channels-last memory -> (B, H, W, C_out) -> (B, C_out, H, W) channels-last
            y = F.linear(x.permute(0, 2, 3, 1), weight[:, :, 0, 0], bias)
            return y.permute(0, 3, 1, 2)
        c = self.c
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def _folded(self, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode BN folded into the conv: weight (C_out, C_in/groups, k, k), bias (C_out,).

        With autograd off, made once (in autocast's low precision when it is on) and reused
        until a parameter or running statistic changes."""
        if torch.is_grad_enabled():
            return self._fold()
        bn = self.bn
        dtype = autocast_dtype(device_type)
        sources = (self.c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return self._cache.get(sources, (dtype, bn.eps), lambda: self._fold(dtype))

    def _fold(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # Eval-mode BN is y = (conv(x) - mean) * g / sqrt(var + eps) + b: fold it into the conv.
        bn, c = self.bn, self.c
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
        weight = c.weight * scale[:, None, None, None]  # (C_out, C_in/groups, k, k)
        bias = bn.bias - bn.running_mean * scale  # (C_out,)
        return (weight, bias) if dtype is None else (weight.to(dtype), bias.to(dtype))


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, D, H/4, W/4): ``seq`` = stride-2 conv+BN, GELU, stride-2 conv+BN."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, stride=2),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_a, _, conv_b = self.seq
        return conv_b(_gelu_(conv_a(x)))  # (B, D/2, H/2, W/2) -> (B, D, H/4, W/4)


class MBConv(nn.Module):
    """Inverted residual block: (B, C, H, W) -> (B, C, H, W).

    1x1 expand (C -> ratio*C), depthwise 3x3, 1x1 project, GELU after each conv, the last
    GELU after adding the shortcut.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _gelu_(self.conv1(x))  # (B, hidden, H, W)
        y = _gelu_(self.conv2(y))  # (B, hidden, H, W)
        y = self.conv3(y)  # (B, C, H, W)
        return _gelu_(_add_(y, x))


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, out_dim, H/stride, W/stride): 1x1 conv, depthwise 3x3, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _gelu_(self.conv1(x))  # (B, out_dim, H, W)
        x = _gelu_(self.conv2(x))  # (B, out_dim, H/stride, W/stride)
        return self.conv3(x)


def relative_offset_index(window_size: int) -> torch.Tensor:
    """(N, N) int64 index into the bias table for every (query, key) pair, N = window_size**2.

    Positions are the window's cells in row-major order. The table has one entry per absolute
    offset (|d_row|, |d_col|), numbered ``|d_row| * window_size + |d_col|`` (the order in which
    MobileSAM enumerates them, so a checkpoint's ``attention_biases`` columns line up).
    """
    cells = torch.arange(window_size)
    rows = cells.repeat_interleave(window_size)  # (N,) row of each cell
    cols = cells.repeat(window_size)  # (N,) column of each cell
    d_row = (rows[:, None] - rows[None, :]).abs()  # (N, N)
    d_col = (cols[:, None] - cols[None, :]).abs()  # (N, N)
    return d_row * window_size + d_col


class Attention(nn.Module):
    """Multi-head self-attention inside one window: (B', N, C) -> (B', N, C), N = window**2.

    Pre-norm (``norm``) inside the module. ``qkv`` output channels are grouped per head as
    [q, k, v] (each C / heads wide). The bias added to the attention logits is
    ``attention_biases[:, attention_bias_idxs]``: (heads, N, N), learned per head and offset.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"expected dim divisible by num_heads, got {dim} and {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer(
            "attention_bias_idxs", relative_offset_index(window_size), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x))  # (B, N, 3C)
        # (B, N, heads, 3, hd) -> (3, B, heads, N, hd)
        q, k, v = qkv.view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        # (heads, T) gathered at (N*N,) -> (1, heads, N, N): a 4-d mask keeps SDPA on its fused
        # CPU kernel; index_select is much faster than advanced indexing here
        idxs = self.attention_bias_idxs.view(-1)  # (N*N,)
        bias = self.attention_biases.index_select(1, idxs).view(1, self.num_heads, N, N)
        # softmax(q k^T / sqrt(hd) + bias) v (SDPA's default scale is hd ** -0.5, as MobileSAM's)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        # (B, heads, N, hd) -> (B, N, heads, hd) -> (B, N, C)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """Pre-norm MLP: (..., C) -> (..., C) via ``norm``, ``fc1`` (C -> hidden), GELU, ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu_(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """(B, H, W, C) -> (B, H, W, C): x + window attention, depthwise conv, x + MLP.

    The grid is zero-padded at the bottom/right to whole windows before attention (padded
    tokens take part as keys, as in MobileSAM) and cropped after. The local conv has no
    residual connection.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, groups=dim)

    def _attention_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention within windows: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_b, pad_r = -H % ws, -W % ws
        xp = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x  # (B, Hp, Wp, C)
        Hp, Wp = H + pad_b, W + pad_r
        nh, nw = Hp // ws, Wp // ws
        # (B, nh, ws, nw, ws, C) -> (B, nh, nw, ws, ws, C) -> (B*nh*nw, ws*ws, C)
        windows = xp.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        out = self.attn(windows)  # (B*nh*nw, ws*ws, C)
        # (B, nh, nw, ws, ws, C) -> (B, nh, ws, nw, ws, C) -> (B, Hp, Wp, C), a new tensor
        out = out.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        return _add_(out[:, :H, :W], x)  # (B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._attention_residual(x)  # (B, H, W, C)
        # (B, H, W, C) -> (B, C, H, W) channels-last view -> conv -> (B, H, W, C)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return _add_(self.mlp(x), x)


class ConvLayer(nn.Module):
    """Stage 0: (B, C, H, W) -> MBConv blocks -> merging -> (B, H/2, W/2, C_out) tokens."""

    def __init__(self, dim: int, out_dim: int, depth: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            raise_if_stopped()  # a stage is ~1 s on a busy 2-core CPU: cancel between blocks
            x = block(x)  # (B, C, H, W)
        return self.downsample(x).permute(0, 2, 3, 1)  # (B, H/2, W/2, C_out)


class BasicLayer(nn.Module):
    """Attention stage: (B, H, W, C) -> TinyViT blocks -> [merging] -> (B, H', W', C_out).

    ``downsample`` is None for the last stage (then H', W', C_out = H, W, C).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int | None,
        merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = None if out_dim is None else PatchMerging(dim, out_dim, merge_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            raise_if_stopped()
            x = block(x)  # (B, H, W, C)
        if self.downsample is None:
            return x
        # (B, H, W, C) -> (B, C, H, W) view -> merge -> (B, H', W', C_out)
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class TinyViT(nn.Module):
    """MobileSAM's TinyViT: (B, in_chans, H, W) normalised image -> (B, out_chans, H/16, W/16).

    The defaults are MobileSAM's vit_t. ``img_size`` (S) is the side of the square input SAM
    feeds it (1024); it is recorded for the caller and fixes nothing inside: attention works
    on fixed-size windows, so any H, W that are multiples of 16 give an (H/16, W/16) grid.
    ``num_classes`` only sizes the unused classification head kept for checkpoint
    compatibility (``norm_head``, ``head``; no ``head`` parameters when it is 0).
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        num_classes: int = 1000,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if not len(depths) == len(num_heads) == len(window_sizes) == n == 4:
            raise ValueError(
                "expected 4 stages in embed_dims, depths, num_heads, window_sizes, got "
                f"{len(embed_dims)}, {len(depths)}, {len(num_heads)}, {len(window_sizes)}"
            )
        self.img_size = img_size
        self.in_chans = in_chans
        self.out_chans = out_chans
        d0 = embed_dims[0]
        self.patch_embed = PatchEmbed(in_chans, d0)
        self.layers = nn.ModuleList([ConvLayer(d0, embed_dims[1], depths[0], mbconv_expand_ratio)])
        for i in range(1, n):
            last = i == n - 1
            self.layers.append(
                BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    out_dim=None if last else embed_dims[i + 1],
                    # the merging into the last stage keeps the grid (S/16 for both)
                    merge_stride=1 if i == n - 2 else 2,
                )
            )
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) float, normalised; H, W multiples of 16 (normally S, S).

        Returns (B, out_chans, H/16, W/16), contiguous.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2] % 16 or x.shape[3] % 16:
            raise ValueError(
                f"expected (B, {self.in_chans}, H, W) with H, W multiples of 16, "
                f"got {tuple(x.shape)}"
            )
        # channels-last memory: the convolutions (depthwise ones above all) run ~2x faster on CPU
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)  # (B, D0, H/4, W/4)
        for layer in self.layers:
            raise_if_stopped()  # cancel acts between stages and between their blocks
            x = layer(x)  # (B, H/8, W/8, D1), then (B, H/16, W/16, D2), (B, H/16, W/16, D3)
        # (B, H/16, W/16, D3) -> (B, D3, H/16, W/16) channels-last view
        x = self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, H/16, W/16)
        return x.contiguous()
