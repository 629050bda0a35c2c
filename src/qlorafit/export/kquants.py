"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) bit for bit, and llama-quantize's choice of type per tensor.

Bit-exact means the same float32 operations in the same order as ggml's reference quantizers
(`quantize_row_q{4,5,6}_K_ref` in ggml/src/ggml-quants.c, which `llama-quantize` runs when there is
no importance matrix). The work is vectorised across the sub-blocks of a tensor: sub-blocks are laid
out element-major, `(32, n_sub)`, so every C loop over the 16 or 32 elements of a sub-block becomes
a short Python loop over rows, and every sum is accumulated one term at a time as C does (numpy's
own `sum` is pairwise and rounds differently). Loops over the fixed candidate scales stay loops.
Each multiply and add rounds on its own: that is what the x86-64 llama.cpp the tests run computes.
A build whose compiler fuses `a * b + c` into one FMA (aarch64 compilers may, by default) can differ
from it, and from this, in the last bit of a scale.

The type rules port `llama_tensor_get_type` and its callers (src/llama-quant.cpp, llama.cpp master at
commit 007dbbf) for the file types in `FILE_TYPES`. The tests check them against the llama.cpp of
llama-cpp-cffi 0.4.42, which agrees except for fused `attn_qkv` tensors: it gave those Q5_K (Q4_K_M)
or Q6_K (Q5_K_M); master rates them like `attn_v`, as this does.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gguf
import numpy as np

from qlorafit.errors import ExportError

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
QK_K = 256
_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)
_CHUNK_BLOCKS = 1024  # super-blocks per vectorised step: the working set stays in cache

# the export types users choose -> general.file_type
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
    "q4_0": F.MOSTLY_Q4_0, "q4_k_s": F.MOSTLY_Q4_K_S, "q4_k_m": F.MOSTLY_Q4_K_M,
    "q5_k_s": F.MOSTLY_Q5_K_S, "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K,
}  # fmt: skip
_DEFAULT_TYPE = {
    F.ALL_F32: Q.F32, F.MOSTLY_F16: Q.F16, F.MOSTLY_BF16: Q.BF16, F.MOSTLY_Q8_0: Q.Q8_0,
    F.MOSTLY_Q4_0: Q.Q4_0, F.MOSTLY_Q4_K_S: Q.Q4_K, F.MOSTLY_Q4_K_M: Q.Q4_K,
    F.MOSTLY_Q5_K_S: Q.Q5_K, F.MOSTLY_Q5_K_M: Q.Q5_K, F.MOSTLY_Q6_K: Q.Q6_K,
}  # fmt: skip
# written by gguf-py's quantizers, which match ggml's reference ones (checked in the tests)
_GGUF_PY_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


# ---------------------------------------------------------------------------------------------
# ggml's helpers, on float32 arrays


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and keep the low mantissa bits.

    That rounds half to even for |x| <= 4194303; outside, it gives the same wrapped value as C.
    """
    return ((x + _F32(12582912.0)).view(np.int32) & 0x007FFFFF) - 0x00400000


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 one term at a time, like C's `s += t[i]` loop."""
    total = terms[0].copy()
    for row in terms[1:]:
        total += row
    return total


def _first_max(values: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's `if (key[j] > best) {best = key[j]; v = values[j];}` from 0 over axis 1: (best, v)."""
    best = np.zeros(values.shape[0], _F32)
    chosen = np.zeros(values.shape[0], _F32)
    for j in range(values.shape[1]):
        better = key[:, j] > best
        best = np.where(better, key[:, j], best)
        chosen = np.where(better, values[:, j], chosen)
    return best, chosen


def _to_fp16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even, as numpy's cast): the half and its float32 value."""
    half = x.astype(np.float16)
    return half, half.astype(_F32)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants on columns: x, weights (n, m) -> scale (m,), -min (m,), levels (n, m)."""
    lo = np.minimum(x.min(axis=0), _F32(0))
    hi = x.max(axis=0)
    flat = hi == lo  # C returns early: levels 0, scale 0
    sum_w = _running_sum(weights)
    sum_x = _running_sum(weights * x)
    iscale = _F32(nmax) / (hi - lo)
    levels = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
    scale = _F32(1) / iscale
    best_error = _running_sum(weights * np.square(scale * levels.astype(_F32) + lo - x))
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (hi - lo)
        trial = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
        lf = trial.astype(_F32)
        wl = weights * lf
        sum_l, sum_l2, sum_xl = _running_sum(wl), _running_sum(wl * lf), _running_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, _F32(0), this_min)
        error = _running_sum(weights * np.square(this_scale * lf + this_min - x))
        better = (det > 0) & (error < best_error) & ~flat
        levels = np.where(better, trial, levels)
        best_error = np.where(better, error, best_error)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    return np.where(flat, _F32(0), scale), -lo, np.where(flat, 0, levels)


def _make_q6_quants(x: np.ndarray):
    """make_qx_quants(16, 32, x, L, rmse_type=1, NULL) on columns: x (16, m) -> scale (m,), levels (16, m)."""
    columns = np.arange(x.shape[1])
    top = np.abs(x).argmax(axis=0)  # the first largest |x|, as C's strict '>'
    amax, peak = np.abs(x[top, columns]), x[top, columns]
    weight = x * x
    weight_x = weight * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        trial = np.clip(_nearest_int(iscale * x), -32, 31)
        lf = trial.astype(_F32)
        return trial, _running_sum(weight_x * lf), _running_sum(weight * lf * lf)

    levels, sumlx, suml2 = fit(_F32(-32) / peak)
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        trial, sumlx, suml2 = fit(-(_F32(32) + _F32(0.1) * _F32(step)) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better, trial, levels)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    tiny = amax < _GROUP_MAX_EPS  # all zero: levels 0 (not 32) and scale 0
    return np.where(tiny, _F32(0), scale), np.where(tiny, 0, levels + 32)


# ---------------------------------------------------------------------------------------------
# super-block quantizers: (n_blocks, 256) float32 -> (n_blocks, type_size) uint8


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 6-bit sub-block scales (or mins): the largest of a block's 8, and each as 0..63 of it."""
    largest, _ = _first_max(values, values)
    inverse = np.where(largest > 0, _F32(63) / np.where(largest > 0, largest, 1), _F32(0))
    levels = np.minimum(_nearest_int(inverse[:, None] * values) & 0xFF, 63)  # uint8_t, then MIN(63, .)
    return largest, levels.astype(np.uint8)


def _requantize(x: np.ndarray, step: np.ndarray, shift, low: int, high: int, fitted: np.ndarray):
    """Levels for the final scales, clip(nearest_int((x + shift) / step)); where step is 0, `fitted`.

    C skips those sub-blocks (`if (!d) continue;`), so they keep the levels of the scale search.
    """
    levels = np.clip(_nearest_int((x + shift) / np.where(step != 0, step, 1)), low, high)
    return np.where(step != 0, levels, fitted)


def _q45_k_levels(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """What quantize_row_q4_K_ref and q5_K_ref share: the 16-byte head (d, dmin, scales) and the levels."""
    n = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)  # (32, n_sub): one row per element position
    av_x = np.sqrt(_running_sum(x * x) / _F32(32))
    scales, mins, fitted = _make_qkx2_quants(x, av_x + np.abs(x), nmax, rmin, rdelta, nstep)
    max_scale, ls = _six_bit(scales.reshape(n, 8))
    max_min, lm = _six_bit(mins.reshape(n, 8))
    d_half, d = _to_fp16(max_scale / _F32(63))
    dmin_half, dmin = _to_fp16(max_min / _F32(63))
    step = (d[:, None] * ls.astype(_F32))[..., None]  # (n, 8, 1)
    shift = (dmin[:, None] * lm.astype(_F32))[..., None]
    levels = _requantize(blocks.reshape(n, 8, 32), step, shift, 0, nmax, fitted.T.reshape(n, 8, 32))
    # get_scale_min_k4's layout: 6-bit scales of sub-blocks 0-3, mins 0-3, then the low nibbles of
    # scales and mins 4-7, whose high 2 bits go to the top of bytes 0-7
    high_ls, high_lm = (ls[:, 4:] >> 4) << 6, (lm[:, 4:] >> 4) << 6
    low = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    halves = [d_half[:, None].view(np.uint8), dmin_half[:, None].view(np.uint8)]
    head = np.concatenate([*halves, ls[:, :4] | high_ls, lm[:, :4] | high_lm, low], axis=1)
    return head, levels.astype(np.uint8).reshape(n, 4, 2, 32)  # (64-chunk, first/second 32, j)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    head, levels = _q45_k_levels(blocks, 15, -1.0, 0.1, 20)
    qs = levels[:, :, 0] | (levels[:, :, 1] << 4)
    return np.concatenate([head, qs.reshape(len(blocks), 128)], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    head, levels = _q45_k_levels(blocks, 31, -0.5, 0.1, 15)
    qs = (levels[:, :, 0] & 0xF) | ((levels[:, :, 1] & 0xF) << 4)
    high = levels.reshape(len(blocks), 8, 32) >> 4  # bit k of qh[j]: level 32k + j > 15
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([head, qh, qs.reshape(len(blocks), 128)], axis=1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)  # (16, n_sub)
    scales, fitted = _make_q6_quants(x)
    scales = scales.reshape(n, 16)
    max_abs, max_scale = _first_max(scales, np.abs(scales))
    empty = max_abs < _GROUP_MAX_EPS  # the whole block is written as zeros
    iscale = _F32(-128) / np.where(empty, 1, max_scale)
    d_half, d = _to_fp16(_F32(1) / iscale)
    small = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)  # int8_t wraps below -128
    step = (d[:, None] * small.astype(_F32))[..., None]  # (n, 16, 1)
    levels = _requantize(blocks.reshape(n, 16, 16), step, 0, -32, 31, fitted.T.reshape(n, 16, 16) - 32) + 32
    levels = levels.astype(np.uint8).reshape(n, 2, 4, 32)  # (128-half h, 32-group r, j)
    ql = (levels[:, :, 0:2] & 0xF) | ((levels[:, :, 2:4] & 0xF) << 4)  # ql[64h + 32s + j]: groups s, s + 2
    qh = np.bitwise_or.reduce((levels >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=2)
    parts = [ql.reshape(n, 128), qh.reshape(n, 64), small.view(np.uint8), d_half[:, None].view(np.uint8)]
    out = np.concatenate(parts, axis=1)
    out[empty] = 0
    return out


_K_QUANTIZERS: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q4_K: _quantize_q4_k, Q.Q5_K: _quantize_q5_k, Q.Q6_K: _quantize_q6_k,
}  # fmt: skip


def quantize_tensor(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Quantize float weights (last axis = rows) into the bytes llama.cpp's reference quantizer writes.

    Returns uint8 of shape `gguf.quants.quant_shape_to_byte_shape(array.shape, qtype)`, ready for
    `GGUFWriter.add_tensor(name, data, raw_dtype=qtype)`. For F32 it may be a view of `array`.
    """
    qtype = Q(qtype)
    data = np.ascontiguousarray(array, dtype=_F32)
    if qtype not in _K_QUANTIZERS and qtype not in _GGUF_PY_TYPES:
        known = ", ".join(t.name for t in (*_GGUF_PY_TYPES, *_K_QUANTIZERS))
        raise ExportError(f"cannot quantize to {qtype.name}: qlorafit writes {known}")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if data.ndim == 0 or data.shape[-1] % block_size:
        length = data.shape[-1] if data.ndim else "none (a scalar)"
        raise ExportError(
            f"cannot quantize a tensor of shape {data.shape} to {qtype.name}: its row length {length} is "
            f"not a multiple of the {qtype.name} block size {block_size}; choose a type whose block size "
            "divides it"
        )
    byte_shape = gguf.quants.quant_shape_to_byte_shape(data.shape, qtype)
    # lanes C skips (flat blocks, zero scales) still compute here, into infinities and NaNs, as do
    # gguf-py's quantizers (and C) on subnormal blocks
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if qtype not in _K_QUANTIZERS:
            return gguf.quants.quantize(data, qtype).view(np.uint8).reshape(byte_shape)
        blocks = data.reshape(-1, QK_K)
        out = np.empty((blocks.shape[0], type_size), np.uint8)
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            out[start : start + _CHUNK_BLOCKS] = _K_QUANTIZERS[qtype](blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(byte_shape)


# ---------------------------------------------------------------------------------------------
# llama-quantize's type per tensor (llama_tensor_get_type and its callers in src/llama-quant.cpp)

# 2-D weights llama.cpp leaves unquantized (tensor_allows_quantization), by substring
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")
# tensor_get_category: first match wins
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)  # fmt: skip
# tensor_type_fallback, for the types these file types use; llama.cpp has none for Q8_0 and Q4_0
# (it refuses the model), where convert_hf_to_gguf.py writes F16, as this does
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# llm_type 70B, the only model size the rules look at: (arch, n_layer); llama also needs GQA
_SEVENTY_B = {("llama", 80), ("qwen2", 80), ("deci", 80), ("jais2", 68)}
_LAYER = re.compile(r"blk\.(-?\d+)")


@dataclass
class _State:
    """quantize_state_impl: the model facts and the counters the rules advance tensor by tensor."""

    ftype: gguf.LlamaFileType
    arch: str
    n_expert: int
    n_layer: int
    is_70b: bool
    tied: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    fallbacks: int = 0


def _layer(name: str) -> int:
    """The block number `sscanf(name, "blk.%d.")` reads, or -1."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def _allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization: weights of 2 or more dimensions (ggml_n_dims), minus a list."""
    n_dims = len(shape)
    while n_dims > 1 and shape[len(shape) - n_dims] == 1:  # ggml_n_dims ignores trailing ggml dims of 1
        n_dims -= 1
    return (
        n_dims >= 2
        and name.endswith("weight")
        and name not in _KEEP_NAMES
        and not any(part in name for part in _KEEP_SUBSTRINGS)
    )


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((category for part, category in _CATEGORIES if part in name), "other")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # the modulo only runs when i_layer >= n_layers // 8, where C's % and Python's agree
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _ffn_down_layer(state: _State, name: str) -> int:
    """layer_info: the counter, except in MoE models, whose expert tensors name their block."""
    if max(1, state.n_expert) == 1:
        return state.i_ffn_down
    i_layer = _layer(name)
    if not 0 <= i_layer < state.n_layer:
        raise ExportError(
            f"tensor {name} names no block in [0, {state.n_layer}); pass this model's n_layer to tensor_types"
        )
    return i_layer


def _output_type(state: _State, row: int, new_type: Q) -> Q:
    """output.weight, and token_embd.weight when the model ties it to the output."""
    if state.arch == "falcon" or row % gguf.GGML_QUANT_SIZES[new_type][0]:
        return Q.Q8_0
    return new_type if new_type == Q.Q8_0 else Q.Q6_K


def _attn_v_type(state: _State, new_type: Q) -> Q:
    ftype, i_layer = state.ftype, state.i_attention_wv
    if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i_layer, state.n_attention_wv):
        new_type = Q.Q6_K
    elif ftype == F.MOSTLY_Q4_K_S and i_layer < 4:
        new_type = Q.Q5_K
    if state.is_70b and new_type in (Q.Q3_K, Q.Q4_K):  # 8 heads share attn_v: more bits cost little
        new_type = Q.Q5_K
    if state.n_expert == 8:
        new_type = Q.Q8_0
    state.i_attention_wv += 1
    return new_type


def _ffn_down_type(state: _State, name: str, new_type: Q) -> Q:
    i_layer, n_layer, ftype = _ffn_down_layer(state, name), state.n_layer, state.ftype
    falcon, more_bits = state.arch == "falcon", _use_more_bits(i_layer, n_layer)
    if ftype == F.MOSTLY_Q4_K_M and falcon:
        new_type = Q.Q6_K if i_layer < n_layer // 16 else Q.Q5_K if more_bits else Q.Q4_K
    elif ftype == F.MOSTLY_Q4_K_M:
        new_type = Q.Q6_K if more_bits else new_type
    elif ftype == F.MOSTLY_Q5_K_M and more_bits:
        new_type = Q.Q6_K
    elif ftype == F.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
        new_type = Q.Q5_K
    state.i_ffn_down += 1
    return new_type


def _mixture_type(state: _State, name: str, row: int, new_type: Q) -> Q:
    """llama_tensor_get_type_impl, for the file types in FILE_TYPES."""
    category = _category(name)
    if category == "output" or (state.tied and category == "token_embd"):
        return _output_type(state, row, new_type)
    if category == "attn_v":
        return _attn_v_type(state, new_type)
    if category == "attn_k" and state.n_expert == 8:
        return Q.Q8_0
    if category == "ffn_down":
        return _ffn_down_type(state, name, new_type)
    moe_bump = state.n_expert == 8 and state.ftype in (F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M)
    if category == "attn_output" and state.arch != "falcon" and moe_bump:
        return Q.Q5_K
    return new_type


def _fallback(state: _State, row: int, new_type: Q) -> Q:
    """tensor_type_fallback: a type whose blocks split rows of this length."""
    if row % gguf.GGML_QUANT_SIZES[new_type][0] == 0:
        return new_type
    state.fallbacks += 1
    fallback = _FALLBACK.get(new_type, Q.F16)
    return fallback if row % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def tensor_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    file_type: str,
    *,
    arch: str,
    n_expert: int = 0,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_layer: int | None = None,
) -> dict[str, gguf.GGMLQuantizationType]:
    """The type llama-quantize gives each tensor of an F32 model for `file_type` (a FILE_TYPES key).

    `tensors` are GGUF names with numpy-order shapes (last = row length). Tensors llama.cpp does
    not quantize (1-D, norms, ...) stay F32. `n_layer` defaults to the blocks the names count;
    `n_head`/`n_head_kv` are needed only for an 80-layer llama (its 70B rule).
    """
    if file_type not in FILE_TYPES:
        raise ExportError(f"unknown GGUF file type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    ftype = FILE_TYPES[file_type]
    names = [name for name, _ in tensors]
    if n_layer is None:
        n_layer = max((_layer(name) + 1 for name in names), default=0)
    if arch == "llama" and n_layer == 80 and (n_head is None or n_head_kv is None):
        raise ExportError("an 80-layer llama model needs n_head and n_head_kv to choose GGUF tensor types")
    state = _State(
        ftype=ftype, arch=arch, n_expert=n_expert, n_layer=n_layer, tied="output.weight" not in names,
        is_70b=(arch, n_layer) in _SEVENTY_B and (arch != "llama" or n_head != n_head_kv),
        n_attention_wv=sum(_category(name) == "attn_v" for name in names),
    )  # fmt: skip
    default_type = _DEFAULT_TYPE[ftype]
    types: dict[str, gguf.GGMLQuantizationType] = {}
    # llama.cpp visits tensors by block, then by name: the counters advance in that order
    for name, shape in sorted(tensors, key=lambda tensor: (_layer(tensor[0]), tensor[0])):
        if not _allows_quantization(name, shape):
            types[name] = Q.F32
        elif default_type in (Q.F32, Q.F16, Q.BF16):
            types[name] = default_type
        else:
            types[name] = _fallback(state, shape[-1], _mixture_type(state, name, shape[-1], default_type))
    if state.fallbacks:
        logger.warning(
            "%d of %d tensors need a fallback type: their rows do not split into the blocks of %s",
            state.fallbacks, len(tensors), file_type,
        )  # fmt: skip
    return {name: types[name] for name in names}
