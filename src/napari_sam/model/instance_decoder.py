"""micro-sam's automatic instance segmentation (AIS) decoder, run on a SAM image embedding.

micro-sam trains torch_em's UNETR on a SAM image encoder (no encoder skip connections, 3
sigmoid outputs) and ships everything but the encoder as a checkpoint's ``"decoder_state"``;
at inference it runs that convolutional part on the stored embedding. This is that part,
with the same state dict keys; :func:`decoder_from_state` builds it from such a state.

Architecture (features F = (512, 256, 128, 64); embedding (B, C, E, E), C = SAM's
``prompt_embed_dim`` = 256 for every encoder, E = img_size / 16)::

    z12 = embedding                                   (B, C,   E,   E)
    z9  = deconv1(z12)                                (B, 512, 2E,  2E)
    z6  = deconv2(z9)                                 (B, 256, 4E,  4E)
    z3  = deconv3(z6)                                 (B, 128, 8E,  8E)
    z0  = deconv4(z3)                                 (B, 64,  16E, 16E)
    x   = base(z12)                                   (B, 512, E,   E)
    for level k in 0..2, with skip = (z9, z6, z3)[k]:
        x = decoder.samplers[k](x)                    (B, F[k+1], ...) twice the size
        x = decoder.blocks[k](cat(x, middle F[k+1] channels of skip))
    x   = deconv_out(x)                               (B, 64,  16E, 16E)
    x   = decoder_head(cat(x, z0))                    (B, 64,  16E, 16E)
    out = sigmoid(out_conv(x))                        (B, 3,   16E, 16E)

``deconvN`` = upsampler, 3x3 conv, BatchNorm, ReLU (keys ``deconvN.block.{0,1,2}``);
``base`` / ``decoder.blocks`` / ``decoder_head`` = [InstanceNorm, 3x3 conv, ReLU] x 2 (conv
keys ``block.1``, ``block.4``). Upsampler: 2x2 stride-2 transposed conv (``….block.weight``)
or bilinear x2 then a 1x1 conv (``….conv.weight``). torch_em centre-crops the skips' channels
(z9[:, 128:384], z6[:, 64:192], z3[:, 32:96]). The output is resized as the UNETR's
``postprocess_masks`` does: bilinear to (img_size, img_size), crop to the resized input
(h, w), bilinear to (H, W); every interpolation with align_corners=False.

The forward computes the same function with less work on CPU: channels-last; BatchNorm
folded into its conv; a 2x2 transposed conv and the 3x3 conv after it merged into one 2x2
conv on the small grid; 1x1 convs before the bilinear upsampling (which commutes with
them); concatenations and InstanceNorms written in place; no identity resize; the last
conv only where the crop needs it.

Cancel: a full-resolution stage is seconds on a CPU, so every 3x3 (and merged 2x2) conv runs
in bands of output rows of ~17 GFLOP each, with a stop check (:func:`.raise_if_stopped`)
after each band and between stages: a cancel acts within a band (~0.2 s on a quiet CPU).
The bands compute the convolution's rows (same result within float rounding).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError
from .config import SamConfig
from .interrupt import Stopped, raise_if_stopped, stop_when

FEATURES = (512, 256, 128, 64)
OUT_CHANNELS = 3  # foreground, centre distances, boundary distances
_EPS = 1e-5  # InstanceNorm2d and BatchNorm2d default
_BAND_FLOPS = 1 << 34  # ~17 GFLOP of conv between two stop checks: ~0.2 s on a quiet CPU
# (smaller bands cost more: +20-30% CPU time per conv at 4 GFLOP on a busy 2-core Xeon)


class _Upsampler(nn.Module):
    """x2 upsampling (B, Cin, S, S) -> (B, Cout, 2S, 2S): ConvTranspose2d(k=2, s=2) (key
    ``block``) or bilinear x2 then a 1x1 conv (key ``conv``; run as the conv then the
    upsampling: equal, the interpolation weights sum to 1)."""

    def __init__(self, in_channels: int, out_channels: int, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        if transposed:
            self.block = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, out: Tensor) -> None:
        """Writes the result into ``out``: (B, 2S, 2S, Cout), a channels-last view."""
        if self.transposed:
            _conv_transpose_2x2(x, self.block.weight, self.block.bias, out)
        else:
            x = _conv_1x1(x, self.conv.weight, self.conv.bias)
            out.copy_(_upsample(x).permute(0, 2, 3, 1))


class _UpBlock(nn.Module):
    """deconv1..4: upsampler, 3x3 conv, BatchNorm (running statistics), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, transposed: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _Upsampler(in_channels, out_channels, transposed),
            nn.ModuleDict({"block": nn.Conv2d(out_channels, out_channels, 3, padding=1)}),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self._merged: tuple[list | None, tuple[Tensor, Tensor, Tensor]] | None = None

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """(B, Cin, S, S) -> (B, Cout, 2S, 2S), channels-last, into ``out`` (B, 2S, 2S, Cout)."""
        B, _, Sh, Sw = x.shape
        if out is None:
            out = x.new_empty(B, 2 * Sh, 2 * Sw, self.block[2].num_features)
        up = self.block[0]
        if up.transposed:
            _merged_conv_relu(x, *self._merged_weights(), out)
        else:
            weight, bias = _fold_batch_norm(self.block[1]["block"], self.block[2])
            x = _upsample(_conv_1x1(x, up.conv.weight, up.conv.bias))  # (B, Cout, 2S, 2S)
            _conv3x3_relu(x, weight, bias, out.permute(0, 3, 1, 2))
        return out.permute(0, 3, 1, 2)

    def _merged_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`merge_deconv_conv` of the current weights (recomputed when one changes)."""
        up, conv, bn = self.block[0].block, self.block[1]["block"], self.block[2]
        tensors = (up.weight, up.bias, conv.weight, conv.bias, *bn.state_dict().values())
        inference = any(t.is_inference() for t in tensors)  # no version counter: no cache
        key = None if inference else [(t.data_ptr(), t._version, t.dtype, t.device) for t in tensors]
        if key is None or self._merged is None or self._merged[0] != key:
            self._merged = key, merge_deconv_conv(up.weight, up.bias, *_fold_batch_norm(conv, bn))
        return self._merged[1]


class _ConvPair(nn.Module):
    """[InstanceNorm, 3x3 conv, ReLU] x 2: (B, Cin, S, S) -> (B, Cout, S, S), channels-last.

    ``inplace``: normalise the input in place (a buffer of the caller's). ``crop_hw``: the
    second conv only as far as its [:h, :w] corner needs (result (B, Cout, h + 1, w + 1))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, inplace: bool = False, crop_hw: tuple[int, int] | None = None):
        conv1, conv2 = self.block[1], self.block[4]
        x = _instance_norm(x, inplace)
        x = _instance_norm(_conv3x3_relu(x, conv1.weight, conv1.bias), True)
        if crop_hw is not None:
            # rows/cols 0..h-1 of a zero-padded 3x3 conv read input rows/cols 0..h only
            x = x[..., : crop_hw[0] + 1, : crop_hw[1] + 1]
        return _conv3x3_relu(x, conv2.weight, conv2.bias)


class _Decoder(nn.Module):
    """torch_em's UNet decoder part: ``blocks`` and ``samplers`` per level."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        pairs = list(itertools.pairwise(FEATURES))
        self.blocks = nn.ModuleList(_ConvPair(cin, cout) for cin, cout in pairs)
        self.samplers = nn.ModuleList(_Upsampler(cin, cout, transposed) for cin, cout in pairs)

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        """x: (B, 512, S, S), skips (z9, z6, z3), channels-last -> (B, 64, 8S, 8S)."""
        for block, sampler, skip, c in zip(self.blocks, self.samplers, skips, FEATURES[1:]):
            raise_if_stopped()
            B, _, Sh, Sw = skip.shape
            both = x.new_empty(B, Sh, Sw, 2 * c)  # cat(upsampled x, skip): (B, 2S, 2S, 2c)
            sampler(x, both[..., :c])
            start = (skip.shape[1] - c) // 2  # torch_em centre-crops the skip's channels
            both[..., c:].copy_(skip[:, start : start + c].permute(0, 2, 3, 1))
            x = block(both.permute(0, 3, 1, 2), inplace=True)  # (B, c, 2S, 2S)
        return x


class DecodingStopped(Stopped):
    """Raised by :meth:`InstanceDecoder.forward` when its ``should_stop()`` (or the check
    of an enclosing :func:`.stop_when`, e.g. a napari job's) said so."""


class InstanceDecoder(nn.Module):
    """micro-sam's AIS decoder (torch_em's UNETR without its encoder), on SAM embeddings.
    State dict keys equal micro-sam's ``decoder_state``. Inference only (BatchNorm uses its
    running statistics).

    Args:
        in_channels: channels C of the image embedding (SAM's ``prompt_embed_dim``, 256 for
            vit_b/l/h and vit_t alike: torch_em sizes it from the encoder's neck).
        img_size: side of the square SAM input (1024 for the official models).
        transposed: upsampling by transposed convolutions (True) or by bilinear
            interpolation plus a 1x1 conv (False); fixed by the trained weights.
    """

    def __init__(self, in_channels: int = 256, img_size: int = 1024, transposed: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.img_size = img_size
        self.transposed = transposed
        f = FEATURES
        self.base = _ConvPair(in_channels, f[0])
        self.decoder = _Decoder(transposed)
        self.deconv1 = _UpBlock(in_channels, f[0], transposed)
        self.deconv2 = _UpBlock(f[0], f[1], transposed)
        self.deconv3 = _UpBlock(f[1], f[2], transposed)
        self.deconv4 = _UpBlock(f[2], f[3], transposed)
        self.deconv_out = _Upsampler(f[3], f[3], transposed)
        self.decoder_head = _ConvPair(2 * f[3], f[3])
        self.out_conv = nn.Conv2d(f[3], OUT_CHANNELS, 1)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        should_stop=None,
    ) -> Tensor:
        """
        Args:
            image_embeddings: (B, C, E, E) float, SAM image embeddings (E = img_size / 16).
            input_size: (h, w) of the image resized to longest side img_size, before padding.
            original_size: (H, W) of the original image.
            should_stop: optional ``() -> bool`` asked between stages and between bands
                of conv rows (~17 GFLOP apart: well under a second on a CPU), as is the
                check of an enclosing :func:`.stop_when`; True raises :class:`DecodingStopped`.

        Returns:
            (B, 3, H, W) float in [0, 1], contiguous: channel 0 foreground probability,
            1 distance to the object centre, 2 distance to the object boundary.
        """
        _check_inputs(image_embeddings, self.in_channels, self.img_size, input_size, original_size)
        with stop_when(should_stop):
            try:
                return self._forward(image_embeddings, input_size, original_size)
            except DecodingStopped:
                raise
            except Stopped:
                raise DecodingStopped() from None

    def _forward(self, image_embeddings: Tensor, input_size, original_size) -> Tensor:
        """:meth:`forward` after the checks, under its stop check."""
        h, w = int(input_size[0]), int(input_size[1])
        B, _, Eh, Ew = image_embeddings.shape
        c = FEATURES[3]
        z12 = image_embeddings.to(  # (B, C, E, E)
            self.out_conv.weight.dtype, memory_format=torch.channels_last
        )
        # the head reads cat(deconv_out(x), z0): both are written into this one buffer
        head = z12.new_empty(B, 16 * Eh, 16 * Ew, 2 * c)
        z9 = self.deconv1(z12)  # (B, 512, 2E, 2E)
        z6 = self.deconv2(z9)  # (B, 256, 4E, 4E)
        z3 = self.deconv3(z6)  # (B, 128, 8E, 8E)
        self.deconv4(z3, out=head[..., c:])  # z0: (B, 64, 16E, 16E)
        x = self.base(z12)  # (B, 512, E, E)
        x = self.decoder(x, [z9, z6, z3])  # (B, 64, 8E, 8E)
        del z3, z6, z9
        raise_if_stopped()
        self.deconv_out(x, head[..., :c])  # (B, 64, 16E, 16E)
        raise_if_stopped()
        # The output is resized to (img_size, img_size), then cropped to (h, w): when that
        # resize is the identity, only the cropped part needs the last convs.
        exact = (16 * Eh, 16 * Ew) == (self.img_size, self.img_size)
        head = head.permute(0, 3, 1, 2)  # (B, 128, 16E, 16E) channels-last
        x = self.decoder_head(head, inplace=True, crop_hw=(h, w) if exact else None)
        del head
        raise_if_stopped()
        x = _conv_1x1(x, self.out_conv.weight, self.out_conv.bias).sigmoid_()  # (B, 3, ., .)
        if exact:
            x = x[..., :h, :w].contiguous()  # (B, 3, h, w)
        else:
            size = (self.img_size, self.img_size)
            x = F.interpolate(x, size, mode="bilinear", align_corners=False)[..., :h, :w]
        H, W = int(original_size[0]), int(original_size[1])
        if (h, w) != (H, W):
            x = F.interpolate(x, (H, W), mode="bilinear", align_corners=False)
        return x.contiguous()


def decoder_from_state(decoder_state: Mapping[str, Tensor], config: SamConfig) -> InstanceDecoder:
    """An eval-mode :class:`InstanceDecoder` for ``config`` holding micro-sam's ``decoder_state``.

    The upsampler kind is read from the keys as micro-sam does: transposed convolutions
    when a ``decoder.samplers…`` key contains ``.block.``.

    Raises:
        CheckpointError: missing, unexpected or wrongly shaped entries.
    """
    if not isinstance(decoder_state, Mapping):
        kind = type(decoder_state).__name__
        raise CheckpointError(f"expected the decoder state as a mapping of names to tensors, got {kind}")
    transposed = any(".block." in k for k in decoder_state if k.startswith("decoder.samplers"))
    decoder = InstanceDecoder(config.prompt_embed_dim, config.img_size, transposed)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in decoder_state.items()}
    problems = {
        "missing": [k for k in expected if k not in shapes],
        "unexpected": [k for k in shapes if k not in expected],
        "wrong shape": [f"{k} {v} (expected {expected[k]})" for k, v in shapes.items() if expected.get(k, v) != v],
    }
    if any(problems.values()):
        found = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}"
            for label, keys in problems.items() if keys
        )
        raise CheckpointError(
            f"expected a micro-sam instance segmentation decoder state for model type "
            f"{config.name!r} ({config.prompt_embed_dim}-channel embedding, "
            f"{'transposed-conv' if transposed else 'interpolation'} upsampling, {len(expected)} "
            f"entries), got {len(shapes)} entries that do not match: {found}"
        )
    decoder.load_state_dict(decoder_state, strict=True)
    return decoder.eval()


def _check_inputs(embeddings, channels, img_size, input_size, original_size) -> None:
    shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)
    if not (isinstance(embeddings, Tensor) and embeddings.dim() == 4) or shape[1] != channels:
        raise ValueError(f"expected image_embeddings of shape (B, {channels}, E, E), got {shape}")
    if not embeddings.is_floating_point():
        raise ValueError(f"expected float image_embeddings, got {embeddings.dtype}")
    for name, size, top in (("input_size", input_size, img_size), ("original_size", original_size, None)):
        if not (len(size) == 2 and all(int(v) == v and 1 <= v <= (top or v) for v in size)):
            bound = f", at most {top}" if top else ""
            raise ValueError(f"expected {name} as (h, w), positive ints{bound}, got {tuple(size)}")


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``conv`` then eval-mode ``bn`` as one conv: weight (Cout, …), bias (Cout,)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (Cout,)
    return conv.weight * scale.view(-1, 1, 1, 1), (conv.bias - bn.running_mean) * scale + bn.bias


def _instance_norm(x: Tensor, inplace: bool) -> Tensor:
    """InstanceNorm2d (no affine, eps 1e-5): (B, C, H, W) -> same, channels-last.

    Sums over cache-sized chunks of pixels, shifted by a first estimate of the mean (torch's
    channels-last norm kernels sum naively: errors ~1e-3 at 1024²)."""
    B, C, H, W = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    out = x if inplace else torch.empty_like(x, memory_format=torch.channels_last)
    rows = max(1, (1 << 19) // C)  # pixels per chunk: 2 MB of float32
    scratch = x.new_empty(min(rows, H * W), C)
    for b in range(B):
        pixels = x[b].permute(1, 2, 0).flatten(0, 1)  # (H * W, C) view
        shift = pixels[:rows].mean(0)  # (C,)
        # float64 sums where the device has them (Apple MPS does not: float32, still shifted)
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        sums = torch.zeros(2, C, dtype=wide, device=x.device)
        for chunk in pixels.split(rows):
            raise_if_stopped()  # a full-resolution norm reads hundreds of MB
            part = torch.sub(chunk, shift, out=scratch[: len(chunk)])
            sums[0] += part.sum(0)
            sums[1] += part.mul_(part).sum(0)
        mean = sums[0] / (H * W)
        rstd = torch.rsqrt((sums[1] / (H * W) - mean * mean).clamp_min(0) + _EPS).to(x.dtype)
        mean = mean.to(x.dtype) + shift
        dest = out[b].permute(1, 2, 0).flatten(0, 1)  # (H * W, C) view
        torch.addcmul(-mean * rstd, pixels, rstd, out=dest)
    return out


def _upsample(x: Tensor) -> Tensor:
    """Bilinear x2, align_corners=False: (B, C, S, S) -> (B, C, 2S, 2S)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _conv_1x1(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """1x1 conv as a matmul over channels: (B, Cin, H, W) -> (B, Cout, H, W) channels-last."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


def _band_rows(weight: Tensor, batch: int, width: int) -> int:
    """Output rows of a conv with ``weight`` (Cout, Cin, k, k) per band of ~_BAND_FLOPS."""
    return max(1, _BAND_FLOPS // (2 * batch * width * weight.numel()))


def _conv_rows(x: Tensor, weight: Tensor, bias: Tensor, padding: int, r0: int, r1: int) -> Tensor:
    """Output rows r0..r1-1 of ``F.conv2d(x, weight, bias, padding=padding)`` (stride 1,
    k x k kernel): (B, Cout, r1 - r0, W + 2p - k + 1), from the input rows they read only."""
    H, k = x.shape[2], weight.shape[2]
    first, last = r0 - padding, r1 - padding + k - 1  # input rows read, padding rows outside [0, H)
    if first >= 0 and last <= H:  # an inner band: no zero rows
        return F.conv2d(x[:, :, first:last], weight, bias, padding=(0, padding))
    start = max(first, 0)  # a border band: zero-padded as the whole conv pads, then cropped
    return F.conv2d(x[:, :, start : min(last, H)], weight, bias, padding=padding)[:, :, r0 - start : r1 - start]


def _conv3x3_relu(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """ReLU(conv3x3(x), padding 1): (B, Cin, H, W) -> (B, Cout, H, W) channels-last, into
    ``out`` when given; in bands of rows with a stop check (:func:`.raise_if_stopped`) after each."""
    B, _, H, W = x.shape
    if out is None:
        out = torch.empty(B, weight.shape[0], H, W, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    rows = _band_rows(weight, B, W)
    for r0 in range(0, H, rows):
        r1 = min(r0 + rows, H)
        torch.clamp_min(_conv_rows(x, weight, bias, 1, r0, r1), 0, out=out[:, :, r0:r1])
        raise_if_stopped()
    return out


def _conv_transpose_2x2(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor) -> None:
    """ConvTranspose2d(k=2, s=2), weight (Cin, Cout, 2, 2): (B, Cin, S, S) channels-last
    into ``out`` (B, 2S, 2S, Cout); each pixel gives a 2x2 block."""
    B, _, H, W = x.shape
    cout = weight.shape[1]
    w = weight.permute(2, 3, 1, 0).reshape(4 * cout, -1)  # rows (dy, dx, Cout)
    y = F.linear(x.permute(0, 2, 3, 1), w, bias.repeat(4))  # (B, H, W, 4 Cout)
    # (B, H, W, dy, dx, C) -> (B, H, dy, W, dx, C)
    y = y.view(B, H, W, 2, 2, cout).permute(0, 1, 3, 2, 4, 5)
    out.unflatten(1, (H, 2)).unflatten(3, (W, 2)).copy_(y)


# A 3x3 tap at row offset dy (index d = dy + 1) of output row 2q - 1 + s of the upsampled
# grid lands on grid row 2q - 1 + s + dy = 2(q - 1 + u) + p: it reads small-grid row
# q - 1 + u (u in {0, 1}) at transposed-conv kernel row p. _TAPS[s][d] = (u, p).
_TAPS = tuple(tuple(((s + d - 2) // 2 + 1, (s + d - 2) % 2) for d in range(3)) for s in range(2))


def merge_deconv_conv(
    weight_t: Tensor, bias_t: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """ConvTranspose2d(k=2, s=2) (weight_t (Cin, M, 2, 2), bias_t (M,)) then Conv2d(k=3,
    padding=1) (weight (Cout, M, 3, 3), bias (Cout,)) as one 2x2 conv on the small grid.

    Returns kernel (4 Cout, Cin, 2, 2): with padding 1 on (B, Cin, S, S) it gives
    (B, 4 Cout, S + 1, S + 1) whose pixel (q, q'), channel (s, t, Cout) is the result at
    row 2q - 1 + s, column 2q' - 1 + t of the 2S grid; bias (4 Cout,): its value off the
    border; taps (Cout, 3, 3): what bias_t adds through each 3x3 tap, to take off where the
    tap falls outside the grid (the 3x3 conv pads with zeros, not with bias_t)."""
    cin, cout = weight_t.shape[0], weight.shape[0]
    # every (3x3 tap, transposed-conv tap) product: (3, 3, 2, 2, Cout, Cin) = (Cout, M) @ (M, Cin)
    products = torch.matmul(
        weight.permute(2, 3, 0, 1)[:, :, None, None], weight_t.permute(2, 3, 1, 0)[None, None]
    )
    kernel = weight.new_zeros(2, 2, 2, 2, cout, cin)  # (s, t, u, v, Cout, Cin)
    for s in range(2):
        for t in range(2):
            for d in range(3):
                for e in range(3):
                    (u, p), (v, q) = _TAPS[s][d], _TAPS[t][e]
                    kernel[s, t, u, v] += products[d, e, p, q]
    kernel = kernel.permute(0, 1, 4, 5, 2, 3)  # (s, t, Cout, Cin, u, v)
    taps = torch.einsum("omde,m->ode", weight, bias_t)  # (Cout, 3, 3)
    inner_bias = bias + taps.sum((1, 2))
    return kernel.reshape(4 * cout, cin, 2, 2), inner_bias.repeat(4), taps


def _merged_conv_relu(x: Tensor, kernel: Tensor, bias: Tensor, taps: Tensor, out: Tensor):
    """ReLU(conv3x3(conv_transpose2x2(x))) from :func:`merge_deconv_conv`'s weights:
    (B, Cin, Sh, Sw) channels-last into ``out`` (B, 2 Sh, 2 Sw, Cout); in bands of rows of
    the merged conv, with a stop check (:func:`.raise_if_stopped`) after each."""
    B, _, Sh, Sw = x.shape
    cout = taps.shape[0]
    out6 = out.unflatten(1, (Sh, 2)).unflatten(3, (Sw, 2))  # grid row 2k + r, col 2k' + c
    rows = _band_rows(kernel, B, Sw + 1)
    for q0 in range(0, Sh + 1, rows):
        q1 = min(q0 + rows, Sh + 1)
        y = _conv_rows(x, kernel, bias, 1, q0, q1).contiguous(memory_format=torch.channels_last)
        # (B, 4 Cout, n, Sw + 1) -> (B, q - q0, q', s, t, Cout): grid row 2q - 1 + s, col 2q' - 1 + t
        y = y.permute(0, 2, 3, 1).view(B, q1 - q0, Sw + 1, 2, 2, cout)
        # taps outside the 2S grid: first row (q=0, s=1) misses dy=-1, last (q=Sh, s=0) dy=+1,
        # first column (q'=0, t=1) dx=-1, last (q'=Sw, t=0) dx=+1; corners miss both
        rows_here = [(q - q0, s, d) for q, s, d in ((0, 1, 0), (Sh, 0, 2)) if q0 <= q < q1]
        cols = ((0, 1, 0), (Sw, 0, 2))  # (q', t, 3x3 tap index)
        for q, s, d in rows_here:
            y[:, q, :, s] -= taps[:, d, :].sum(-1)
        for q, t, e in cols:
            y[:, :, q, :, t] -= taps[:, :, e].sum(-1)
        for q, s, d in rows_here:
            for q2, t, e in cols:
                y[:, q, q2, s, t] += taps[:, d, e]  # corners: counted twice above
        for r in range(2):
            # grid row 2k + r is (q, s) = (k, 1) for r = 0 and (k + 1, 0) for r = 1
            k0, k1 = max(q0 - r, 0), min(q1 - r, Sh)
            if k0 >= k1:
                continue
            for c in range(2):
                torch.clamp_min(y[:, k0 + r - q0 : k1 + r - q0, c : c + Sw, 1 - r, 1 - c], 0,
                                out=out6[:, k0:k1, r, :, c])
        raise_if_stopped()
