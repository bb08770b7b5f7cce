"""Reading checkpoint files safely and matching them to a model."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, unsafe, or the wrong model)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` on the CPU without ever running pickled code.

    Accepts a plain state dict (the official files) or one wrapped as ``{"model": …}`` /
    ``{"state_dict": …}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint file, got {str(path)!r} (no such file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message also suggests weights_only=False; we never do that
        detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln.upper() and "unsupported" in ln.lower()), "")
        if detail:
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects, not only "
                f"tensors, and loading it could run code ({detail})"
            ) from None
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint: the file is truncated or corrupt. "
            "Delete it and download it again."
        ) from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail in many ways inside torch.load
        # (RuntimeError, EOFError, BadZipFile, IndexError from the unpickler's stack…)
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint: the file is truncated or corrupt "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Delete it and download it again."
        ) from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping) and len(obj) <= 3:
                obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"expected {path} to hold a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def guess_model_type(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Which SAM the keys look like: 'vit_b' | 'vit_l' | 'vit_h' | 'vit_t', or None."""
    qkv = state_dict.get("image_encoder.blocks.0.attn.qkv.weight")
    if qkv is not None:
        width = qkv.shape[1]
        depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
        known = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
        return known.get((width, depth), f"a ViT SAM of width {width} and depth {depth}")
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "vit_t"
    return None


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], expected: str) -> None:
    """Strictly load ``state_dict`` into ``model``, or raise one clear :class:`CheckpointError`
    naming the expected model type, the type the file looks like and the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        looks = guess_model_type(state_dict) or "not a Segment Anything checkpoint"
        parts = [f"checkpoint does not fit model type {expected!r}; the file looks like {looks}."]
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:5])}")
        raise CheckpointError(" ".join(parts))
    model.load_state_dict(state_dict, strict=True)
