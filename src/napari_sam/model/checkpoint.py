"""Reading checkpoint files safely and matching them to a model."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, unsafe, or the wrong model)."""


# Where fine-tuning code puts the weights inside a checkpoint dict, most specific first:
# micro-sam / torch_em trainers save ``{"model_state": …, "optimizer_state": …, …}``
# (micro-sam's AIS models add a ``"decoder_state"``), many scripts ``{"model": …}`` or
# ``{"state_dict": …}`` (Lightning). Other top-level entries are ignored.
WRAPPER_KEYS = ("model_state", "model", "state_dict")
# Key prefixes added by wrappers around the model: DistributedDataParallel ("module.") and
# micro-sam's TrainableSAM ("sam."). Stripped only when every key carries them.
KEY_PREFIXES = ("module.", "sam.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in ``path`` (see :func:`read_checkpoint`, which also returns an
    AIS decoder state when the file holds one)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Load ``(sam_state, decoder_state)`` from ``path`` on the CPU without ever running
    pickled code; ``decoder_state`` is micro-sam's AIS decoder (``"decoder_state"`` beside
    ``"model_state"``, as micro-sam exports its models) or None.

    Accepts a plain state dict (the official files), one wrapped as ``{"model_state": …}``
    / ``{"model": …}`` / ``{"state_dict": …}`` (other entries such as an optimizer state
    are ignored), with keys prefixed by ``module.`` (DDP) or ``sam.`` (micro-sam / torch_em
    training) when all of them are.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable (permissions), truncated/corrupt, holding pickled code,
            or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint file, got {str(path)!r} (no such file)")
    if not os.access(path, os.R_OK):
        raise _permission_error(path)
    try:
        with warnings.catch_warnings():  # torch warns before failing on protocol 4/5 pickles
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise _permission_error(path) from None
    except pickle.UnpicklingError as exc:
        # torch's message also suggests weights_only=False; we never do that. It names the
        # refused global for protocol-2 pickles (torch.save), but fails earlier on protocol
        # 4/5 ones ("Unsupported operand 149"): then the file's opcodes tell (read, not run).
        refused = _pickled_callables(path) or _refused_global(str(exc))
        if refused:
            raise CheckpointError(
                f"refused to load {path}: it holds pickled Python objects, not only tensors, "
                f"and loading it would run code from the file ({refused}). napari-sam only "
                "loads plain weights (torch.load with weights_only=True). If you trust the "
                "file, export a plain state dict in a trusted environment: load the model "
                "there and run torch.save(model.state_dict(), path), then use that file."
            ) from None
        raise _corrupt_error(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail in many ways inside torch.load
        # (RuntimeError, EOFError, BadZipFile, IndexError from the unpickler's stack…)
        raise _corrupt_error(path, exc) from None
    decoder_state = None
    if isinstance(obj, Mapping) and obj.get("decoder_state") is not None:
        decoder_state = _unwrap_state_dict(obj["decoder_state"], path, what="decoder_state")
    return _unwrap_state_dict(obj, path), decoder_state


def _permission_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path}: permission denied. Make the file readable for this user "
        f"(e.g. chmod u+r {str(path)!r}) or copy it somewhere readable."
    )


def _corrupt_error(path: Path, exc: BaseException) -> CheckpointError:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"cannot read {path} as a PyTorch checkpoint: the file is truncated or corrupt "
        f"({type(exc).__name__}: {first_line}). Delete it and download it again."
    )


def _refused_global(message: str) -> str | None:
    """What torch's weights-only unpickler refused, from its message (e.g. "GLOBAL print
    was not an allowed global by default" -> "calls print"), or None."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return f"calls {match.group(1)}" if match else None


# opcodes that import or call something when unpickled
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickled_callables(path: Path, max_pickles: int = 8) -> str | None:
    """Read (never run) the pickle(s) of ``path`` — a raw pickle, a legacy torch file (a few
    pickles in a row) or a zip torch file's ``data.pkl`` — and describe the functions/classes
    they would import beyond torch's tensor machinery, or None when no complete pickle
    imports any (garbage bytes)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                stream = io.BytesIO(archive.read(name))
        else:
            stream = open(path, "rb")  # noqa: SIM115 - closed below
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None
    names: list[str] = []
    with stream:
        for _ in range(max_pickles):
            found = _globals_of_one_pickle(stream)
            if found is None:  # not a complete pickle: stop (storages or garbage follow)
                break
            names += [n for n in found if n not in names]
    allowed = _weights_only_allowed()
    names = [n for n in names if n not in allowed]
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"calls {shown}"


def _weights_only_allowed() -> set[str]:
    """'module.name' of what torch's weights-only unpickler accepts (tensor rebuilding…):
    not worth naming to the user. A private torch API: an empty set if it moves."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        return set()


def _globals_of_one_pickle(stream) -> list[str] | None:
    """Names a pickle imports (module.name, '?' where not resolvable), or None if the bytes
    are not one complete pickle."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # last values pushed, enough to resolve STACK_GLOBAL
    names: list[str] = []
    imports = False
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            op = opcode.name
            if op in _STRING_OPCODES:
                recent.append(arg)
            elif op in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif op == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif op in _CODE_OPCODES:
                imports = True
                if op in ("GLOBAL", "INST"):  # arg "module name"; protocol <= 2 says __builtin__
                    names.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
                elif op == "STACK_GLOBAL":
                    module, name = (recent[-2:] if len(recent) >= 2 else [None, None])
                    ok = isinstance(module, str) and isinstance(name, str)
                    names.append(f"{module}.{name}" if ok else "?")
                recent.append(None)
            else:
                recent.append(None)
            del recent[:-4]
            if op == "STOP":
                return names if imports else []
    except Exception:  # noqa: BLE001 - not a pickle (ValueError, EOF, unknown opcode…)
        return None
    return None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj, path: Path, what: str = "") -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: unwrap known containers, strip prefixes."""
    for _ in range(len(WRAPPER_KEYS)):  # nested wrappers, e.g. {"state_dict": {"model": …}}
        if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not _is_tensor_dict(obj) or not obj:
        if isinstance(obj, Mapping):
            others = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            got = f"a dict with non-tensor entries ({', '.join(others[:5])})" if others else "an empty dict"
        else:
            got = type(obj).__name__
        where = f"its {what!r} entry" if what else "a dict of tensors (a state dict, possibly under " \
            f"{' / '.join(repr(k) for k in WRAPPER_KEYS)})"
        raise CheckpointError(f"expected {path} to hold {where}"
                              f"{' to be a dict of tensors' if what else ''}, got {got}")
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


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
