"""GGML tensor types: decoding the blocks a GGUF file stores into float32 values.

Each type packs a fixed number of values (32 or 256) into a fixed number of bytes. The legacy
types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the plain floats are decoded here with vectorised torch
code, bit-exact with gguf-py's reference; the K-quants and IQ types go through transformers' torch
dequantizers (`transformers.integrations.gguf.dequant`); anything else the `gguf` package can
decode goes through its numpy code. A type none of them knows is refused with its name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from ..errors import ModelLoadError

try:  # transformers' torch dequantizers for K-quants and IQ types (an internal module)
    from transformers.integrations.gguf.dequant import GGML_BLOCK as _TRANSFORMERS_TYPES
    from transformers.integrations.gguf.dequant import dequantize as _transformers_dequantize
except ImportError:  # another transformers layout: gguf-py's numpy code decodes them instead
    _TRANSFORMERS_TYPES, _transformers_dequantize = {}, None

# Elements decoded per step: bounds the temporaries to a few times 16 MB on any tensor size.
CHUNK_ELEMENTS = 1 << 22


def type_name(qtype: int) -> str:
    """The GGML name of a type id ("Q4_K"), or "type N" for an id the gguf package does not know."""
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


_KNOWN_IDS = frozenset(int(t) for t in GGML_QUANT_SIZES)


def type_sizes(qtype: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) of a GGML type, or None when the type is unknown."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)] if int(qtype) in _KNOWN_IDS else None


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block, as a float32 column (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 4-bit codes: element j is byte j's low nibble, element j+16 its high one."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes (a little-endian uint32) -> its 32 bits, bit j for element j, shifted to bit 4."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).reshape(qh.shape[0], 32)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # 34 bytes: f16 scale d, 32 int8 codes; x = d * q
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks, 0)


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # 18 bytes: f16 scale d, 16 bytes of 4-bit codes; x = d * (q - 8)
    codes = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _half(blocks, 0) * codes.float()


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # 20 bytes: f16 scale d, f16 minimum m, 16 bytes of 4-bit codes; x = d * q + m
    # (a multiply then an add, each rounded, as ggml does: no fused multiply-add)
    codes = _nibbles(blocks[:, 4:]).float()
    return (_half(blocks, 0) * codes) + _half(blocks, 2)


def _dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # 22 bytes: f16 scale d, 32 fifth bits, 16 bytes of low nibbles; x = d * (q - 16)
    codes = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])).to(torch.int8) - 16
    return _half(blocks, 0) * codes.float()


def _dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # 24 bytes: f16 scale d, f16 minimum m, 32 fifth bits, 16 bytes of low nibbles; x = d * q + m
    codes = (_nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])).float()
    return (_half(blocks, 0) * codes) + _half(blocks, 2)


_OWN: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F32: lambda blocks: blocks.view(torch.float32),
    GGMLQuantizationType.F16: lambda blocks: blocks.view(torch.float16).float(),
    GGMLQuantizationType.BF16: lambda blocks: blocks.view(torch.bfloat16).float(),
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q5_0: _dequantize_q5_0,
    GGMLQuantizationType.Q5_1: _dequantize_q5_1,
}


def _with_transformers(qtype: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def dequantize(blocks: torch.Tensor) -> torch.Tensor:
        return _transformers_dequantize(blocks, int(qtype), torch.float32)

    return dequantize


def _with_gguf(qtype: GGMLQuantizationType) -> Callable[[torch.Tensor], torch.Tensor]:
    def dequantize(blocks: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), qtype))

    return dequantize


def decoder(qtype: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function (n_blocks, type_size) uint8 -> float32 values for GGML type `qtype`.

    `qtype` must be a type the gguf package knows (`type_sizes` is not None); raises
    NotImplementedError for one that nothing here can decode.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype in _OWN:
        return _OWN[qtype]
    if int(qtype) in _TRANSFORMERS_TYPES and _transformers_dequantize is not None:
        return _with_transformers(qtype)
    if qtype in gguf_quants._type_traits:  # the types gguf-py implements a dequantizer for
        return _with_gguf(qtype)
    raise NotImplementedError(f"GGML type {qtype.name} has no dequantizer in gguf-py or transformers")


def dequantize_gguf_data(data: np.ndarray, qtype: int) -> torch.Tensor:
    """The float32 values of GGUF tensor data `data` (its raw bytes, any shape) of type `qtype`, flat."""
    sizes = type_sizes(qtype)
    if sizes is None:
        raise ModelLoadError(f"unknown GGML tensor type {type_name(qtype)}")
    block_size, type_size = sizes
    dequantize = decoder(qtype)
    raw = np.asarray(data).reshape(-1).view(np.uint8)  # may be a read-only view of a memory map
    n_blocks = raw.size // type_size
    out = torch.empty(n_blocks * block_size, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        chunk = raw[start * type_size : stop * type_size]
        # torch wants writable memory: a chunk of a memory map is copied out first
        blocks = torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy()).view(stop - start, type_size)
        out[start * block_size : stop * block_size] = dequantize(blocks).reshape(-1)
    return out
