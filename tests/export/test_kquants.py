"""kquants against llama.cpp's own quantizer: the type llama-quantize picks for every tensor, and
the very bytes it writes, on tiny F32 models with realistic weights and awkward rows."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from qlorafit.errors import ExportError
from qlorafit.export.kquants import FILE_TYPES, quantize_tensor, tensor_types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp  # noqa: E402  tests/llama_cpp.py

Q = gguf.GGMLQuantizationType
VOCAB = 320

# name -> model shape; "odd" has rows of 288 (fallback types) and ties its embeddings
MODELS = {
    "dense": dict(arch="llama", hidden=256, ff=512, layers=8, heads=4, kv_heads=2),
    "odd": dict(arch="llama", hidden=288, ff=512, layers=3, heads=4, kv_heads=2, tied=True),
    "moe": dict(arch="llama", hidden=256, ff=256, layers=2, heads=4, kv_heads=1, experts=8),
    # checked for types only: the 70B rule (80 layers with GQA, not without), experts != 8, falcon
    "70b": dict(arch="llama", hidden=32, ff=256, layers=80, heads=4, kv_heads=1),
    "65b": dict(arch="llama", hidden=32, ff=256, layers=80, heads=4, kv_heads=4),
    "moe4": dict(arch="llama", hidden=32, ff=256, layers=4, heads=4, kv_heads=2, experts=4),
    "falcon": dict(arch="falcon", hidden=32, ff=256, layers=16, heads=4, kv_heads=1),
}
K_MIXES = ("q4_k_m", "q4_k_s", "q5_k_m")  # the file types whose rules look at layers, experts, arch
BYTE_CASES = [
    *[("dense", file_type) for file_type in FILE_TYPES],
    *[("odd", file_type) for file_type in ("q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0", "q8_0")],
    ("moe", "q4_k_m"), ("moe", "q4_k_s"), ("moe", "q5_k_m"),
]  # fmt: skip
# Q4_K_M's attn_v and ffn_down in 8 layers: Q6_K where use_more_bits says so
MORE_BITS_OF_8 = [Q.Q6_K, Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q6_K]
TYPE_CASES = [(model, file_type) for model in ("70b", "65b", "moe4", "falcon") for file_type in K_MIXES]


def edge_rows(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace the first rows with the cases quantizers get wrong: zeros, an outlier, one sign only,
    tiny and subnormal-range magnitudes, constant blocks, rounding ties, zero sub-blocks."""
    rows = weights.reshape(-1, weights.shape[-1])
    if rows.shape[0] < 10:
        return weights
    n = rows.shape[1]
    rows[0] = 0
    rows[1, rng.integers(n)] = 40.0 * rows[1].std()
    rows[2] = -np.abs(rows[2])
    rows[3] = np.abs(rows[3]) + 0.05
    rows[4] *= 1e-6  # fp16 scales underflow to 0: C keeps the levels of the scale search
    rows[5] *= 1e-30  # sums of squares underflow
    rows[6] = -0.01  # max == min
    rows[7] = rng.integers(-6, 7, n) / 64  # exact halves: round half to even
    rows[8].reshape(-1, 16)[::3] = 0
    rows[9].reshape(-1, 16)[1::4] *= 1e-5
    return weights


def build(arch: str, hidden: int, ff: int, layers: int, heads: int, kv_heads: int, tied: bool = False,
          experts: int = 0, seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Float32 weights in GGUF names and numpy layout: heavy-tailed, rows of different scales."""
    rng = np.random.default_rng(seed)

    def matrix(*shape: int) -> np.ndarray:
        spread = 10 ** rng.uniform(-0.5, 0.5, (*shape[:-1], 1))
        return edge_rows((rng.standard_t(5, shape) * spread / np.sqrt(shape[-1])).astype(np.float32), rng)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    kv = hidden // heads * kv_heads
    tensors = {"token_embd.weight": matrix(VOCAB, hidden)}
    for b in range(layers):
        tensors[f"blk.{b}.attn_norm.weight"] = norm()
        if arch == "falcon":
            tensors[f"blk.{b}.attn_qkv.weight"] = matrix(hidden + 2 * kv, hidden)
        else:
            tensors[f"blk.{b}.attn_q.weight"] = matrix(hidden, hidden)
            tensors[f"blk.{b}.attn_k.weight"] = matrix(kv, hidden)
            tensors[f"blk.{b}.attn_v.weight"] = matrix(kv, hidden)
            tensors[f"blk.{b}.ffn_norm.weight"] = norm()
        tensors[f"blk.{b}.attn_output.weight"] = matrix(hidden, hidden)
        if experts:
            tensors |= {f"blk.{b}.ffn_gate_inp.weight": matrix(experts, hidden),
                        f"blk.{b}.ffn_gate_exps.weight": matrix(experts, ff, hidden),
                        f"blk.{b}.ffn_up_exps.weight": matrix(experts, ff, hidden),
                        f"blk.{b}.ffn_down_exps.weight": matrix(experts, hidden, ff)}  # fmt: skip
        else:
            if arch != "falcon":
                tensors[f"blk.{b}.ffn_gate.weight"] = matrix(ff, hidden)
            tensors[f"blk.{b}.ffn_up.weight"] = matrix(ff, hidden)
            tensors[f"blk.{b}.ffn_down.weight"] = matrix(hidden, ff)
    tensors["output_norm.weight"] = norm()
    if not tied:
        tensors["output.weight"] = matrix(VOCAB, hidden)
    return tensors


def write_f32_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str, hidden: int, ff: int, layers: int,
                   heads: int, kv_heads: int, experts: int = 0, **_) -> None:  # fmt: skip
    """An all-F32 GGUF file with the hyperparameters llama.cpp's quantizer reads (no tokenizer needed)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(VOCAB)
    if arch == "falcon":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-5)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_quantized(tmp_path_factory):
    """(model, file type) -> (our float32 weights, llama.cpp's GGUFReader of its quantized file)."""
    llama_cpp.require()
    folder = tmp_path_factory.mktemp("kquants")
    sources: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}

    def make(model: str, file_type: str) -> tuple[dict[str, np.ndarray], gguf.GGUFReader]:
        if model not in sources:
            weights = build(**MODELS[model])
            write_f32_gguf(folder / f"{model}-source.gguf", weights, **MODELS[model])
            sources[model] = (folder / f"{model}-source.gguf", weights)
        source, weights = sources[model]
        out = folder / f"{model}-{file_type}.gguf"
        llama_cpp.quantize(source, out, file_type.upper())
        return weights, gguf.GGUFReader(out)

    return make


def ours_for(model: str, weights: dict[str, np.ndarray], file_type: str) -> dict[str, Q]:
    config = MODELS[model]
    shapes = [(name, array.shape) for name, array in weights.items()]
    return tensor_types(shapes, file_type, arch=config["arch"], n_expert=config.get("experts", 0),
                        n_head=config["heads"], n_head_kv=config["kv_heads"])  # fmt: skip


@pytest.mark.parametrize("model,file_type", BYTE_CASES)
def test_same_types_and_bytes_as_llama_cpp(model, file_type, llama_quantized):
    weights, reader = llama_quantized(model, file_type)
    field = reader.fields["general.file_type"]
    assert field.parts[field.data[0]][0] == FILE_TYPES[file_type]
    theirs = {tensor.name: Q(tensor.tensor_type) for tensor in reader.tensors}
    assert ours_for(model, weights, file_type) == theirs
    for tensor in reader.tensors:
        expected = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        got = quantize_tensor(weights[tensor.name], theirs[tensor.name]).reshape(-1)
        assert np.array_equal(got, expected), f"{tensor.name} as {theirs[tensor.name].name}"


@pytest.mark.parametrize("model,file_type", TYPE_CASES)
def test_same_types_as_llama_cpp(model, file_type, llama_quantized):
    weights, reader = llama_quantized(model, file_type)
    theirs = {tensor.name: Q(tensor.tensor_type) for tensor in reader.tensors}
    ours = ours_for(model, weights, file_type)
    # fused attn_qkv: llama.cpp master rates it like attn_v; the early-2025 build tested here gave
    # it a type of its own (test_attn_qkv_is_rated_like_attn_v checks master's rule)
    for types in (ours, theirs):
        for name in [name for name in types if "attn_qkv" in name]:
            del types[name]
    assert ours == theirs


def test_the_models_exercise_the_rules(llama_quantized):
    """The cases above reach each rule: more bits for attn_v/ffn_down, fallbacks, ties, MoE, 70B, falcon."""
    types = {case: {t.name: Q(t.tensor_type) for t in llama_quantized(*case)[1].tensors} for case in
             [("dense", "q4_k_m"), ("odd", "q4_k_m"), ("odd", "q4_0"), ("moe", "q4_k_m"), ("70b", "q4_k_m"),
              ("65b", "q4_k_m"), ("falcon", "q4_k_m")]}  # fmt: skip
    dense = types["dense", "q4_k_m"]
    assert [dense[f"blk.{b}.attn_v.weight"] for b in range(8)] == MORE_BITS_OF_8
    assert dense["output.weight"] == Q.Q6_K and dense["token_embd.weight"] == Q.Q4_K
    assert dense["blk.0.attn_norm.weight"] == Q.F32
    odd = types["odd", "q4_k_m"]
    assert odd["token_embd.weight"] == Q.Q8_0  # tied, rows of 288
    assert (odd["blk.0.attn_q.weight"], odd["blk.2.attn_v.weight"], odd["blk.2.ffn_down.weight"]) == (
        Q.Q5_0, Q.Q8_0, Q.Q6_K)  # Q4_K and Q6_K fall back; ffn_down's rows are 512 long  # fmt: skip
    assert types["odd", "q4_0"]["token_embd.weight"] == Q.Q8_0  # Q6_K, which falls back
    moe = types["moe", "q4_k_m"]
    assert moe["blk.0.attn_v.weight"] == moe["blk.0.attn_k.weight"] == Q.Q8_0
    assert moe["blk.0.attn_output.weight"] == Q.Q5_K and moe["blk.0.ffn_gate_inp.weight"] == Q.F32
    assert types["70b", "q4_k_m"]["blk.10.attn_v.weight"] == Q.Q5_1  # Q5_K for 70B, falls back on rows of 32
    assert types["65b", "q4_k_m"]["blk.10.attn_v.weight"] == Q.Q5_0
    falcon = types["falcon", "q4_k_m"]
    assert falcon["output.weight"] == Q.Q8_0 and falcon["blk.0.ffn_down.weight"] == Q.Q6_K
    assert falcon["blk.1.ffn_down.weight"] == Q.Q5_K and falcon["blk.3.ffn_down.weight"] == Q.Q4_K


def test_attn_qkv_is_rated_like_attn_v():
    shapes = [(f"blk.{b}.attn_qkv.weight", (768, 256)) for b in range(8)] + [("output.weight", (64, 256))]
    qkv = tensor_types(shapes, "q4_k_m", arch="phi3")
    assert [qkv[f"blk.{b}.attn_qkv.weight"] for b in range(8)] == MORE_BITS_OF_8


def test_plain_file_types_keep_1d_and_listed_tensors_f32():
    shapes = [
        ("token_embd.weight", (64, 96)), ("position_embd.weight", (32, 96)), ("blk.0.ffn_norm.weight", (96,)),
        ("blk.0.attn_q.bias", (96,)), ("blk.0.ffn_up.weight", (1, 96)), ("blk.0.ssm_conv1d.weight", (8, 4)),
        ("blk.0.ffn_down.weight", (96, 64)),
    ]  # fmt: skip
    for file_type, default in (("f16", Q.F16), ("bf16", Q.BF16), ("f32", Q.F32)):
        types = tensor_types(shapes, file_type, arch="llama")
        assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == default
        assert {types[n] for n in types if n not in ("token_embd.weight", "blk.0.ffn_down.weight")} == {Q.F32}


def test_rows_no_block_fits_fall_back_to_f16(caplog):
    shapes = [  # rows of 264: not a multiple of 32
        ("blk.0.attn_q.weight", (64, 264)),
        ("blk.0.ffn_down.weight", (264, 512)),
        ("output.weight", (9, 264)),
    ]
    with caplog.at_level(logging.WARNING, logger="qlorafit.export.kquants"):
        types = tensor_types(shapes, "q4_k_m", arch="llama")
    assert types == {"blk.0.attn_q.weight": Q.F16, "blk.0.ffn_down.weight": Q.Q6_K, "output.weight": Q.F16}
    assert "2 of 3 tensors need a fallback type" in caplog.text
    # llama.cpp refuses Q8_0 for rows of 264; convert_hf_to_gguf.py writes F16, as this does
    assert set(tensor_types(shapes, "q8_0", arch="llama").values()) == {Q.F16, Q.Q8_0}


def test_type_choice_errors():
    with pytest.raises(ExportError, match="unknown GGUF file type 'q3_k'.*q4_k_m"):
        tensor_types([], "q3_k", arch="llama")
    with pytest.raises(ExportError, match="n_head and n_head_kv"):
        tensor_types([(f"blk.{b}.attn_v.weight", (256, 256)) for b in range(80)], "q4_k_m", arch="llama")
    with pytest.raises(ExportError, match=r"blk.9.ffn_down_exps.weight names no block in \[0, 2\)"):
        experts = [("blk.9.ffn_down_exps.weight", (8, 32, 256))]
        tensor_types(experts, "q4_k_m", arch="llama", n_expert=8, n_layer=2)


def test_quantize_tensor_layout_and_errors():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((2, 3, 512)).astype(np.float32)
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16, Q.F32):
        data = quantize_tensor(weights, qtype)
        assert data.dtype == np.uint8
        assert data.shape == gguf.quants.quant_shape_to_byte_shape(weights.shape, qtype)
        back = gguf.quants.dequantize(data, qtype)  # gguf-py reads our layout as the values we meant
        assert back.shape == weights.shape and np.abs(back - weights).max() < 0.25
    with pytest.raises(ExportError, match=r"\(4, 288\) to Q4_K: its row length 288 is not a multiple"):
        quantize_tensor(np.zeros((4, 288), np.float32), Q.Q4_K)
    with pytest.raises(ExportError, match="cannot quantize to Q2_K"):
        quantize_tensor(np.zeros((4, 256), np.float32), Q.Q2_K)
