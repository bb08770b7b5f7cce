"""Model configurations: the four SAM sizes differ only here.

``MODEL_CONFIGS`` is the single registry; :func:`build_model` turns a config into a
randomly initialised :class:`~napari_sam.model.sam.Sam` (weights come from a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ViTConfig:
    """SAM ViT image encoder (vit_b / vit_l / vit_h)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM TinyViT image encoder (vit_t)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class SamConfig:
    """A whole SAM model.

    ``img_size`` is the side S of the square model input; the image embedding is
    (prompt_embed_dim, S/16, S/16) and low-res masks are (S/4, S/4).
    """

    name: str
    encoder_kind: Literal["vit", "tiny_vit"]
    encoder: ViTConfig | TinyViTConfig = field(default_factory=ViTConfig)
    img_size: int = 1024
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16

    @property
    def embedding_size(self) -> int:
        return self.img_size // 16

    def with_changes(self, **changes) -> SamConfig:
        """A copy with some fields replaced (e.g. a reduced size for tests)."""
        return replace(self, **changes)


MODEL_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig("vit_b", "vit", ViTConfig(768, 12, 12, (2, 5, 8, 11))),
    "vit_l": SamConfig("vit_l", "vit", ViTConfig(1024, 24, 16, (5, 11, 17, 23))),
    "vit_h": SamConfig("vit_h", "vit", ViTConfig(1280, 32, 16, (7, 15, 23, 31))),
    "vit_t": SamConfig("vit_t", "tiny_vit", TinyViTConfig()),
}


def get_config(model_type: str) -> SamConfig:
    """The config for ``model_type``: an architecture of ``MODEL_CONFIGS`` or a model of
    the zoo (``napari_sam.model.zoo``, e.g. "vit_b_lm": vit_b's config under that name)."""
    if model_type in MODEL_CONFIGS:
        return MODEL_CONFIGS[model_type]
    from .zoo import ZOO, zoo_config

    if model_type in ZOO:
        return zoo_config(model_type)
    raise ValueError(f"expected model_type in {list(ZOO)}, got {model_type!r}")


def build_model(config: SamConfig):
    """A randomly initialised, eval-mode :class:`Sam` for ``config``."""
    from .image_encoder import ImageEncoderViT
    from .mask_decoder import MaskDecoder
    from .prompt_encoder import PromptEncoder
    from .sam import Sam
    from .transformer import TwoWayTransformer

    enc = config.encoder
    if config.encoder_kind == "vit":
        image_encoder = ImageEncoderViT(
            img_size=config.img_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            window_size=enc.window_size,
            global_attn_indexes=enc.global_attn_indexes,
        )
    elif config.encoder_kind == "tiny_vit":
        from .tiny_vit import TinyViT

        image_encoder = TinyViT(
            img_size=config.img_size,
            embed_dims=enc.embed_dims,
            depths=enc.depths,
            num_heads=enc.num_heads,
            window_sizes=enc.window_sizes,
            mlp_ratio=enc.mlp_ratio,
        )
    else:
        raise ValueError(f"expected encoder_kind 'vit' or 'tiny_vit', got {config.encoder_kind!r}")
    size = config.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(size, size),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            num_heads=config.decoder_heads,
            mlp_dim=config.decoder_mlp_dim,
        ),
    )
    return Sam(config, image_encoder, prompt_encoder, mask_decoder).eval()
