"""SAM mask decoder: image embedding + prompt tokens -> mask logits and IoU scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLP, DerivedFromParameters, LayerNorm2d
from .interrupt import raise_if_stopped
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
        # the two transposed convs as linear layers, reshaped once (see _as_linear)
        self._upscaler_linear = (DerivedFromParameters(), DerivedFromParameters())
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
        min_iou: float | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            image_embeddings: (1, C, He, We) embedding of one image.
            image_pe: (1, C, He, We) positional encoding (unused with ``cache``).
            sparse_prompt_embeddings: (B, T, C) point/box tokens.
            dense_prompt_embeddings: (B, C, He, We), or (1, C, He, We) when it is the same
                for every prompt (no mask input): the image side is then shared.
            multimask_output: three masks (True) or the single-output mask (False).
            cache: ``transformer.image_side(image_embeddings + dense, image_pe)`` when the
                dense embedding is shared; saves the prompt-independent first-layer work.
            min_iou: if given, masks are upscaled only for the B' prompts with a predicted
                IoU above it (the upscaling is most of a prompt's cost; the IoU is known
                before it), and their indices are returned too.
        Returns:
            masks (B, 3 or 1, 4He, 4We) logits, iou_pred (B, 3 or 1); with ``min_iou``:
            masks (B', 3 or 1, 4He, 4We), iou_pred (B, 3 or 1), prompt indices (B',) int64.
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens[None].expand(b, -1, -1)  # (B, 1 + M, C)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)  # (B, T', C)

        _, c, h, w = image_embeddings.shape
        # with a cache the transformer already has the image tokens (embedding + dense)
        src = None if cache is not None else image_embeddings + dense_prompt_embeddings
        transformer = self.transformer
        queries, src_tokens, key_pe = transformer.two_way_layers(src, image_pe, tokens, cache)
        # the final attention only for the token rows read: the IoU token of every prompt
        # (row 0), then the K mask tokens asked for (rows 1 + k), of the prompts kept
        keep = slice(1, None) if multimask_output else slice(0, 1)
        mask_rows = [1 + k for k in range(self.num_mask_tokens)][keep]
        mlps = list(self.output_hypernetworks_mlps)[keep]
        if min_iou is None:  # every prompt's masks: all the rows in one pass over the image
            rows = None
            final = transformer.final_tokens(queries, src_tokens, key_pe, tokens, [0, *mask_rows])
            iou_token_out, mask_tokens_out = final[:, 0], final[:, 1:]  # (B, C), (B, K, C)
            iou_pred = self.iou_prediction_head(iou_token_out)[:, keep]  # (B, K)
        else:
            iou_token_out = transformer.final_tokens(queries, src_tokens, key_pe, tokens, [0])[:, 0]
            iou_pred = self.iou_prediction_head(iou_token_out)[:, keep]  # (B, K)
            # in float32, as callers filter the returned IoU: a bf16 comparison would round
            # min_iou to bf16 first and drop prompts between it and min_iou
            rows = (iou_pred.float() > min_iou).any(dim=1).nonzero()[:, 0]  # (B',)
            if len(rows) == 0:
                return src_tokens.new_zeros(0, iou_pred.shape[1], 4 * h, 4 * w), iou_pred, rows
            src_tokens = src_tokens.expand(b, -1, -1)[rows]  # (B', HW, C)
            queries, tokens = queries[rows], tokens[rows]
            mask_tokens_out = transformer.final_tokens(queries, src_tokens, key_pe, tokens, mask_rows)
        n = len(queries)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(mlps)], dim=1
        )  # (n, K, C/8) for the K masks asked for
        raise_if_stopped()  # the upscaling is a third of a decode: not for a stopped one
        masks = self._upscale_and_project(src_tokens.expand(n, -1, -1).reshape(n, h, w, c), hyper_in)
        if rows is None:
            return masks, iou_pred
        return masks, iou_pred, rows

    def _upscale_and_project(self, src: Tensor, hyper_in: Tensor) -> Tensor:
        """``hyper_in · output_upscaling(src)`` computed channels-last with matmuls.

        A 2x2 stride-2 transposed convolution maps each input pixel to its own 2x2 output
        block, i.e. it is one matmul (Cin -> Cout*4) followed by a pixel shuffle. The layer
        norm, GELUs, second convolution and projection all act on each pixel's channels
        alone, so both shuffles are applied once, at the end, to the K projected masks
        instead of the channels (exact: every value is computed from the same numbers).

        Args:
            src: (B, H, W, C) image tokens; hyper_in: (B, K, C/8).
        Returns:
            (B, K, 4H, 4W) mask logits.
        """
        conv1, norm, _, conv2, _ = self.output_upscaling
        b, h, w, _ = src.shape
        linear1, linear2 = self._upscaler_linear
        x = self._conv_transpose_2x2(src, conv1, linear1)  # (B, H, W, 2, 2, C/4)
        x = F.gelu(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
        x = F.gelu(self._conv_transpose_2x2(x, conv2, linear2))  # (B, H, W, 2, 2, 2, 2, C/8)
        # (K, C/8) @ (C/8, pixels): the K masks come out as rows, no (pixels, K) transpose
        masks = hyper_in.to(x.dtype) @ x.reshape(b, -1, x.shape[-1]).transpose(1, 2)
        k = hyper_in.shape[1]
        return _interleave_subpixels(masks.reshape(b, k, h, w, 2, 2, 2, 2))

    def _conv_transpose_2x2(
        self, x: Tensor, conv: nn.ConvTranspose2d, linear: DerivedFromParameters
    ) -> Tensor:
        """(..., Cin) -> (..., 2, 2, Cout): stride-2 2x2 transposed conv of each pixel."""
        weight, bias = self._as_linear(conv, linear)
        out = F.linear(x, weight, bias)  # (..., 4*Cout)
        return out.reshape(*x.shape[:-1], 2, 2, conv.weight.shape[1])

    @staticmethod
    def _as_linear(conv: nn.ConvTranspose2d, linear: DerivedFromParameters) -> tuple[Tensor, Tensor]:
        """The (4*Cout, Cin) weight, rows ordered (ky, kx, Cout), and (4*Cout,) bias of
        ``conv`` as a linear layer. Reshaped once, not per call: kept in ``linear`` while
        the conv's parameters are unchanged (a load_state_dict, .to() or an edit of the
        weights makes them again)."""
        cin, cout = conv.weight.shape[:2]
        if torch.is_grad_enabled() and conv.weight.requires_grad:  # training: no detached copy
            return conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, cin), conv.bias.repeat(4)
        return linear.get(
            (conv.weight, conv.bias),
            None,
            lambda: (
                conv.weight.detach().permute(2, 3, 1, 0).reshape(4 * cout, cin).contiguous(),
                conv.bias.detach().repeat(4),
            ),
        )


def _interleave_subpixels(masks: Tensor) -> Tensor:
    """(B, K, H, W, y1, x1, y2, x2) -> (B, K, 4H, 4W), output pixel (4h + 2 y1 + y2,
    4w + 2 x1 + x2).

    The x2 pairs stay side by side, so without autograd each pair is moved as one
    element of twice the width (the bits are copied, not converted): the strided copy
    then has half the elements and no inner loop of length 2, which is several times
    faster than permuting single floats.
    """
    b, k, h, w = masks.shape[:4]
    order = (0, 1, 2, 4, 6, 3, 5, 7)  # (B, K, H, y1, y2, W, x1, x2)
    pair = {2: torch.int32, 4: torch.int64}.get(masks.element_size())
    if pair is None or masks.requires_grad:
        return masks.permute(order).reshape(b, k, 4 * h, 4 * w)
    pairs = masks.contiguous().view(pair)  # (B, K, H, W, y1, x1, y2, 1)
    return pairs.permute(order).reshape(b, k, 4 * h, 2 * w).view(masks.dtype)
