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


def cli_wording(message: str) -> str:
    """An engine message worded for the command line: Python keyword arguments such as
    ``checkpoint=`` become the matching options (``--checkpoint PATH``); one line."""
    message = re.sub(r"pass its path as `checkpoint=`", "pass its path with --checkpoint PATH",
                     message)
    message = re.sub(r"`?\bdecoder_checkpoint=`?", "--decoder-checkpoint PATH", message)
    message = re.sub(r"`?\bcheckpoint=(\"[^\"]*\"|'[^']*')?`?", "--checkpoint PATH", message)
    return " ".join(message.split())
