"""Subcommands of the ``napari-sam`` command line (see ``napari_sam.cli``)."""

from __future__ import annotations

import argparse
import re

from ..engine.device import PRECISIONS
from ..model.zoo import ZOO

MODELS = tuple(ZOO)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --decoder-checkpoint, --device, --precision: the same for
    every command."""
    parser.add_argument("--model", default="vit_b", choices=MODELS, metavar="NAME",
                        help="model name (default vit_b): " + ", ".join(MODELS)
                        + "; see `napari-sam models`")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint file (default: the model's published file(s), downloaded once)")
    parser.add_argument("--decoder-checkpoint", metavar="PATH",
                        help="AIS decoder file (micro-sam's *_decoder.pt) for a --checkpoint "
                             "without a decoder_state")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="image encoder precision")


def add_tiling_arguments(parser: argparse.ArgumentParser, work: str) -> None:
    """--tiling, --tile-shape, --halo: the same for every command; ``work`` says what is
    done per tile (e.g. "encoded")."""
    parser.add_argument("--tiling", choices=("auto", "on", "off"),
                        help=f"cut large images into overlapping tiles, each {work} at full "
                             "resolution: auto (when the longest side exceeds 1.5 model "
                             "inputs; the default, or the tiling of an existing --store), on, off")
    parser.add_argument("--tile-shape", type=int, nargs="+", metavar="PX",
                        help="tile size in pixels, one number or ROWS COLS (default: the "
                             "model's input, 1024)")
    parser.add_argument("--halo", type=int, nargs="+", metavar="PX",
                        help="context kept around each tile's own part, one number or ROWS "
                             "COLS (default: an eighth of the tile)")


def tiling_flags(args) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(tile_shape, halo) of the command line as (rows, cols) pairs or None, checked
    (ValueError) without the model: one or two numbers, a tile > 0, a halo >= 0, and no
    sizes with --tiling off."""
    def pair(values, name: str, least: int):
        if values is None:
            return None
        if len(values) not in (1, 2) or min(values) < least:
            raise ValueError(f"expected {name} as one or two integers >= {least} (ROWS [COLS]), "
                             f"got {' '.join(map(str, values))}")
        return int(values[0]), int(values[-1])

    tile, halo = pair(args.tile_shape, "--tile-shape", 1), pair(args.halo, "--halo", 0)
    if args.tiling == "off" and (tile or halo):
        raise ValueError("expected --tiling auto or on with --tile-shape/--halo, got --tiling off")
    return tile, halo


def cli_wording(message: str) -> str:
    """An engine message worded for the command line: Python keyword arguments such as
    ``checkpoint=`` become the matching options (``--checkpoint PATH``); one line."""
    message = re.sub(r"pass its path as `checkpoint=`", "pass its path with --checkpoint PATH",
                     message)
    message = re.sub(r"`?\bdecoder_checkpoint=`?", "--decoder-checkpoint PATH", message)
    message = re.sub(r"`?\bcheckpoint=(\"[^\"]*\"|'[^']*')?`?", "--checkpoint PATH", message)
    return " ".join(message.split())
