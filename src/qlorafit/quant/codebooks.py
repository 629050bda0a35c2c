"""The code books of block-wise quantization: NF4, FP4 and the signed 8-bit dynamic map.

Each maps a code (an index) to a value in [-1, 1]; a block of weights is stored as codes plus
its absolute maximum, and a weight is `codebook[code] * absmax`. The values are the ones
bitsandbytes uses, to the last bit, so files move between the two libraries unchanged.
"""

from __future__ import annotations

import functools
import sys

import torch

# NormalFloat4: quantiles of N(0, 1) with equal probability mass, normalised to [-1, 1], with an
# exact zero (QLoRA, Dettmers et al. 2023, appendix E). Sorted ascending.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1, exponent bias 2) in bit-pattern order: bit 3 is the sign, bits 0-2 the magnitude
# 0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12. Not sorted.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@functools.cache
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    data = torch.tensor(list(_FP4_MAGNITUDES) + [-m for m in _FP4_MAGNITUDES], dtype=torch.float32)
    return data / data.abs().max()


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values of a 4-bit code book ("nf4" or "fp4") as a new float32 tensor on `device`."""
    return _code_4bit_cpu(quant_type).to(device, copy=True)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic map (Dettmers 2015, "8-bit approximations"): for exponent e = 0..6 the
    # interval [0.1, 1] * 10^(e-6) is split into 2^e equal parts and the midpoints taken, for
    # both signs; plus 0 and 1. That is 2 * 127 + 2 = 256 values, sorted ascending.
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value signed dynamic 8-bit code book, sorted ascending, float32 on `device`."""
    return _dynamic_map_cpu().to(device)


@functools.cache
def _unsigned_dynamic_map_cpu() -> torch.Tensor:
    # Unsigned: for e = 0..6, 2^(e+1) midpoints of [0.1, 1] * 10^(e-6); plus 0 and 1. Sorted.
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float32)
        values += ((10 ** (e - 6)) * (bounds[:-1] + bounds[1:]) / 2.0).tolist()
    values += [0.0, 1.0]  # 254 + 2 = 256
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def unsigned_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value unsigned dynamic 8-bit code book (non-negative data, e.g. Adam's second moment)."""
    return _unsigned_dynamic_map_cpu().to(device)


@functools.cache
def _quantize_bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_4bit_cpu(quant_type)
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


def quantize_bounds_4bit(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted code values, and the permutation from sorted to code order.

    A scaled weight `x` gets code `order[i]` where `i` is the number of midpoints strictly
    below `x` (ties round down), which is how bitsandbytes rounds.
    """
    bounds, order = _quantize_bounds_cpu(quant_type)
    return bounds.to(device), order.to(device)


@functools.cache
def _pair_table_cpu(quant_type: str) -> torch.Tensor:
    code = _code_4bit_cpu(quant_type)
    byte = torch.arange(256)
    # (256, 2): the two values a packed byte decodes to, high nibble first.
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()


@functools.cache
def _device_table(kind: str, quant_type: str, device: torch.device) -> torch.Tensor:
    # Lookup tables live once per device for the process (1 MiB for the quad table), never
    # copied again on each call.
    table = _quad_table_cpu(quant_type) if kind == "quad" else _pair_table_cpu(quant_type)
    return table.to(device)


def pair_table_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (256, 2) table giving both code values of every packed byte (high nibble first)."""
    return _device_table("pair", quant_type, torch.device(device))


@functools.cache
def _quad_table_cpu(quant_type: str) -> torch.Tensor:
    code = _code_4bit_cpu(quant_type)
    word = torch.arange(65536)
    # Two packed bytes read as one native-endian uint16: find which byte comes first in memory.
    first, second = (word & 0xFF, word >> 8) if sys.byteorder == "little" else (word >> 8, word & 0xFF)
    return torch.stack([code[first >> 4], code[first & 0xF], code[second >> 4], code[second & 0xF]], 1).contiguous()


def quad_table_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (65536, 4) table giving the four code values of every pair of packed bytes (1 MiB)."""
    return _device_table("quad", quant_type, torch.device(device))
