"""Small building blocks shared by the SAM modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The low precision autocast runs matmuls in on ``device_type`` now; None when off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if dtype == torch.float32 else dtype


class DerivedFromParameters:
    """One value computed from some parameters (a low-precision copy, BatchNorm folded into a
    conv), kept while they are unchanged and remade when they change.

    A change is a new storage (``.to``, ``.half()``, assigning a new Parameter) or an
    in-place write through the tensor (``load_state_dict``, ``optimizer.step``), which bumps
    its version counter; writes through ``.data`` are not seen. The value is made without
    autograd: use it only when autograd is off.
    """

    def __init__(self) -> None:
        # one (key, value) pair, replaced whole: a reader in another thread never pairs
        # one call's key with another call's value
        self._entry: tuple[tuple, object] | None = None

    def get(self, sources: tuple[torch.Tensor | None, ...], variant, make: Callable[[], T]) -> T:
        """``make()``, or its value from an earlier call with the same ``variant`` and
        unchanged ``sources``."""
        if any(t is not None and t.is_inference() for t in sources):
            return make()  # inference tensors have no version counter to watch
        key = (variant,) + tuple(
            None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources
        )
        entry = self._entry
        if entry is not None and entry[0] == key:
            return entry[1]
        # a normal tensor even inside inference_mode, so it stays usable outside it
        with torch.inference_mode(False), torch.no_grad():
            value = make()
        self._entry = (key, value)
        return value

    def clear(self) -> None:
        """Forget the value (for changes the version counters miss)."""
        self._entry = None


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose weight and bias, under autocast
    to a low precision with autograd off, are cast once and reused by every later call.

    Autocast alone casts the float32 parameters again in every autocast region (every
    encode: ~90 M values for vit_b). The float32 parameters stay the master copy: the cast
    copy is remade when they change (see :class:`DerivedFromParameters`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cast = DerivedFromParameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x.device.type)
        if dtype is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        weight, bias = self._cast.get(
            (self.weight, self.bias),
            dtype,
            lambda: (self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)),
        )
        return F.linear(x, weight, bias)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Parameters ``weight`` and ``bias`` have shape (C,), as in the official checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W); statistics over C for every pixel
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them: (..., D) -> (..., D).

    Submodule names ``lin1``/``lin2`` match the official checkpoints.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them: (..., in) -> (..., out).

    Submodules are ``layers.0 … layers.{num_layers-1}`` as in the official checkpoints.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
