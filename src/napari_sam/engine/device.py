"""Choosing the device and the numeric precision.

Precision applies to the image encoder (where the time goes). ``auto`` picks:

* CUDA: bf16 where the GPU supports it, else fp16;
* Apple MPS: fp16;
* CPU: bf16 when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX),
  where it measured ~3x faster than fp32 for vit_b (see BENCHMARKS.md); fp32 otherwise
  (emulated bf16 is slower than fp32).

Fidelity of the CPU bf16 encoder: the block matmuls run in bf16, attention and the neck in
fp32. A random-weight vit_b on the prompts of Meta's predictor notebook (1800x1200 image,
15 masks) gives a smallest mask IoU of 0.991 against fp32 (embedding relative error
0.0049); with the neck in bf16 too it was 0.987 (0.0076), below the 0.99 bound. Measured
with the emulated bf16 of a CPU without it: bf16 inputs, fp32 accumulation, the rounding
of the native kernels, so the same on every CPU kind. Not measured on CUDA, where
attention also runs in the low precision.
"""

from __future__ import annotations

import functools
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available, else mps, else cpu; otherwise validated as given."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"expected a device like 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but PyTorch sees no CUDA GPU here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but Apple MPS is not available here")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def choose_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Map ``precision`` in ``PRECISIONS`` to an autocast dtype (None = float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"expected precision in {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision 'fp16' is not supported on the CPU; use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 instructions: 'bf16' will be slower than 'fp32'")
    return _DTYPES[precision]
