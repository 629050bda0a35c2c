"""Block-wise 4-bit and 8-bit quantization, bit-exact with bitsandbytes 0.50 on the CPU.

A tensor is flattened and cut into blocks of `blocksize` elements (the last one may be short).
Each block keeps its absolute maximum; each element becomes the index of the nearest code-book
value of `x / absmax`. 4-bit codes are packed two per byte, first element in the high nibble,
as a `(ceil(numel / 2), 1)` uint8 tensor. With double quantization the float32 block scales
are themselves 8-bit quantized (after subtracting their mean) in blocks of 256.

The arithmetic copies bitsandbytes' exactly (4-bit: multiply by the reciprocal of the scale,
round at the midpoints with ties down; 8-bit: divide by the scale, nearest value with ties
to the lower code) because "close" is not enough for a file format: the same weight must give
the same bytes in both libraries.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from ..errors import QuantizationError
from .codebooks import (
    BLOCKSIZES_4BIT,
    QUANT_TYPES,
    code_4bit,
    dynamic_map,
    pair_table_4bit,
    quad_table_4bit,
    quantize_bounds_4bit,
)
from .state import QuantState

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256


def check_4bit_settings(quant_type: str, blocksize: int) -> None:
    """Raise a QuantizationError unless `quant_type` and `blocksize` are supported."""
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"unknown 4-bit quant type {quant_type!r}: use one of {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise QuantizationError(
            f"blocksize {blocksize!r} is not supported: use a power of two from 32 to 4096 "
            f"({', '.join(map(str, BLOCKSIZES_4BIT))})"
        )


def _check_float(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise QuantizationError(f"{what} needs a float32, float16 or bfloat16 tensor, got {t.dtype}")


def _split_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full blocks as a (blocks, blocksize) view, the short tail as a 1-D view)."""
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].view(-1, blocksize), flat[full:]


def _scale_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the elements scaled into [-1, 1], as bitsandbytes computes them."""
    blocks, tail = _split_blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).view(-1)
    if tail.numel():
        # The short last block stores its clamped scale and divides (not multiplies).
        tail_max = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_max, -1, 1)])
    return absmax, scaled


# Elements quantized per step (a multiple of every block size): bounds the float32
# temporaries to a few tens of MB whatever the size of the weight.
_QUANT_CHUNK = 1 << 22


def _quantize_chunk(piece: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, block scales) of a 1-D piece that starts on a block boundary."""
    absmax, scaled = _scale_4bit(piece.float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = quantize_bounds_4bit(quant_type, piece.device)
    codes = torch.bucketize(scaled, bounds, out_int32=True)
    del scaled
    if quant_type != "nf4":
        codes = order[codes]
    codes = codes.to(torch.uint8).view(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` to packed 4-bit codes; returns `(packed uint8 (ceil(n/2), 1), QuantState)`."""
    check_4bit_settings(quant_type, blocksize)
    _check_float(w, "quantize_4bit")
    flat = w.detach().reshape(-1)
    # Blocks are independent, so quantizing chunk by chunk gives the same bytes as all at once.
    pieces = [_quantize_chunk(flat[i : i + _QUANT_CHUNK], quant_type, blocksize) for i in range(0, flat.numel(), _QUANT_CHUNK)]
    packed = torch.cat([p for p, _ in pieces]).unsqueeze(1)
    absmax = torch.cat([a for _, a in pieces])
    state = QuantState(
        absmax=absmax,
        code=code_4bit(quant_type, flat.device),
        blocksize=blocksize,
        dtype=w.dtype,
        shape=w.shape,
        quant_type=quant_type,
    )
    if double_quant:
        state.offset = absmax.mean()
        state.absmax, state.state2 = quantize_blockwise(absmax - state.offset, blocksize=NESTED_BLOCKSIZE)
    return packed, state


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> None:
    """Multiply each block of the flat `values` (the last may be short) by its scale, in place."""
    blocks, tail = _split_blocks(values, blocksize)
    blocks.mul_(scales[: blocks.shape[0]].view(-1, 1))
    if tail.numel():
        tail.mul_(scales[blocks.shape[0]])


def block_scales(state: QuantState) -> torch.Tensor:
    """The float32 per-block scales of a state, undoing double quantization if used."""
    if state.state2 is None:
        return state.absmax.float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def _decode_codes(packed: torch.Tensor, quant_type: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Code-book values of every nibble, high nibble first: (2 * bytes,) float32.

    Pairs of bytes are read as uint16 and looked up in a (65536, 4) table, so one gather
    yields four values; an odd last byte goes through the (256, 2) table.
    """
    codes = packed.reshape(-1)
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)
    nbytes = codes.numel()
    out = torch.empty(2 * nbytes, dtype=torch.float32, device=codes.device) if out is None else out[: 2 * nbytes]
    even = nbytes - nbytes % 2
    if even:
        words = codes[:even].view(torch.uint16).int()
        torch.index_select(quad_table_4bit(quant_type, codes.device), 0, words, out=out[: 2 * even].view(-1, 4))
    if even != nbytes:
        out[2 * even :] = pair_table_4bit(quant_type, codes.device)[codes[even:].int()].view(-1)
    return out


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    reuse_buffer: bool = False) -> torch.Tensor:
    """Decode packed 4-bit codes to a tensor of `state.shape` in `dtype` (default `state.dtype`).

    Values are scaled per block in float32 and rounded once into `dtype`, like bitsandbytes.
    With `reuse_buffer`, float32 output is written into the open `dequant_workspace`'s buffer,
    which the next such call overwrites (no allocation, no page faults: for a weight that one
    matmul consumes and drops); without an open workspace it is a new tensor.
    """
    dtype = dtype or state.dtype
    n = state.shape.numel()
    if packed.numel() * 2 < n:
        raise QuantizationError(
            f"packed 4-bit tensor holds {packed.numel() * 2} codes but the state's shape "
            f"{tuple(state.shape)} needs {n}"
        )
    scales = block_scales(state)
    # Another dtype is rounded from float32 values: decode into the workspace's float32 buffer
    # when one is open (a fresh 4-byte-per-weight buffer costs more in page faults than the decode).
    scratch = None if dtype == torch.float32 and not reuse_buffer else _scratch(packed.numel() * 2, packed.device)
    values = _decode_codes(packed, state.quant_type, scratch)[:n]
    _scale_blocks_(values, scales, state.blocksize)
    return values.view(state.shape).to(dtype)  # no copy for float32


class DequantWorkspace:
    """The float32 buffers that dequantization writes into while a workspace is open.

    One buffer per device, grown to the largest weight decoded so far and dropped when the
    workspace closes; see `dequant_workspace`.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def buffer(self, numel: int, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(device, None)  # the old buffer goes before the bigger one is made
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buf = self.buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


_WORKSPACE: contextvars.ContextVar[DequantWorkspace | None] = contextvars.ContextVar("qlorafit_dequant_workspace",
                                                                                     default=None)


@contextlib.contextmanager
def dequant_workspace() -> Iterator[DequantWorkspace]:
    """Reuse one float32 buffer for every transient dequantized weight inside the block.

    Training and evaluation open one for their whole run: each forward and backward of a 4-bit
    layer then decodes into the same memory instead of allocating (and page-faulting) a new
    weight-sized tensor, and the memory is released when the block ends. Outside a workspace
    every dequantization allocates its own tensor. Nested blocks share the outer workspace.
    """
    outer = _WORKSPACE.get()
    if outer is not None:
        yield outer
        return
    workspace = DequantWorkspace()
    token = _WORKSPACE.set(workspace)
    try:
        yield workspace
    finally:
        _WORKSPACE.reset(token)
        workspace.buffers.clear()


def _scratch(numel: int, device: torch.device) -> torch.Tensor | None:
    """The open workspace's float32 buffer of at least `numel` elements on `device`, or None."""
    workspace = _WORKSPACE.get()
    return None if workspace is None else workspace.buffer(numel, device)


_LUT_SIZE = 65536


def _nearest_code_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) uint8: the nearest code for each point of a uniform grid over [-1, 1].

    bitsandbytes' CPU kernel rounds `x` to the grid, then reads this table; the grid point
    `i` is `-1 + 2i / 65535` and gets the number of code midpoints strictly below it.
    """
    code = code.float().cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


_TABLES: dict[tuple[bytes, torch.device], torch.Tensor] = {}


def _code_table(code: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The code book (the dynamic map by default) and its nearest-code table on `device`, cached
    per code book and device (the optimizer's 8-bit states quantize with it every step)."""
    code = dynamic_map() if code is None else code.float().cpu()
    if code.numel() != 256:
        raise QuantizationError(f"an 8-bit code book needs 256 sorted values, got {code.numel()}")
    key = (code.numpy().tobytes(), device)
    if key not in _TABLES:
        _TABLES[key] = _nearest_code_table(code).to(device)
    return code, _TABLES[key]


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096
) -> tuple[torch.Tensor, QuantState]:
    """8-bit block-wise quantization with the signed dynamic map (or `code`, 256 sorted values).

    Each element is scaled by its block's reciprocal absmax, snapped to a 65536-point grid
    over [-1, 1] and mapped to the nearest code through a table, which is exactly what
    bitsandbytes' CPU kernel does (and within one grid step of true nearest rounding).
    """
    _check_float(x, "quantize_blockwise")
    if blocksize <= 0:
        raise QuantizationError(f"blocksize must be positive, got {blocksize}")
    code, table = _code_table(code, x.device)
    flat = x.detach().reshape(-1).float()
    blocks, tail = _split_blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax).view(-1, 1)
    if tail.numel():
        tail_max = tail.abs().max()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled.view(-1), tail * (1.0 / tail_max)])
    # An all-zero block gives 0 * inf = nan here; bitsandbytes stores code 0 for it.
    scaled = torch.nan_to_num(scaled.view(-1), nan=-1.0).clamp_(-1.0, 1.0)
    grid = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int32)
    idx = table[grid]
    state = QuantState(absmax=absmax, code=code.to(x.device, copy=True), blocksize=blocksize, dtype=x.dtype)
    return idx.view(x.shape), state


def dequantize_blockwise(q: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode 8-bit block-wise codes back to `dtype` (default the state's dtype)."""
    if q.dtype != torch.uint8:
        raise QuantizationError(f"dequantize_blockwise expects uint8 codes, got {q.dtype}")
    values = state.code.float()[q.reshape(-1).int()]
    _scale_blocks_(values, block_scales(state), state.blocksize)
    return values.view(q.shape).to(dtype or state.dtype)
