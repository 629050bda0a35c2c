"""Choosing the device and the compute dtype.

`auto` means bfloat16 on CUDA, and on a CPU float32 unless it has native bf16 matrix units
(AMX or AVX512-BF16): on an AVX2-only CPU a bf16 matmul runs hundreds of times slower.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> the first CUDA GPU if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_compute_dtype(spec: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """The dtype matmuls run in, from a name ("auto", "float32", "bf16", ...) or a torch dtype."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        device = device or resolve_device("auto")
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if spec not in _DTYPES:
        raise ModelLoadError(f"unknown compute dtype {spec!r}: use auto, float32, float16 or bfloat16")
    return _DTYPES[spec]


def parse_dtype(spec: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name like "float16" or "bf16"."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {spec!r}: use float32, float16 or bfloat16")
    return _DTYPES[spec]
