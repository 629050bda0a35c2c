"""A tiny random llama model written as an F32 GGUF file that llama.cpp itself loads and runs.

The file carries llama.cpp's standard llama keys, a byte-level BPE ("gpt2") tokenizer of
`VOCAB_SIZE` tokens (256 byte tokens, a few merges, three control tokens) and llama.cpp's tensor
names. Q and K rows are stored in llama.cpp's interleaved rotary order, as the HF to GGUF
converter writes them; `write_tiny_llama_gguf` returns the Hugging Face (unpermuted) weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from qlorafit.export.gguf_layout import permute_rotary  # HF rotary halves -> llama.cpp's pairs

CONTEXT_LENGTH = 256
ROPE_THETA = 10000.0
RMS_EPS = 1e-5

# merges in rank order; each part is a byte token or the result of an earlier merge
MERGES = (
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "Ġ a", "r e", "e n", "a t",
    "o r", "Ġ s", "Ġ w", "Ġt he", "i s", "e s", "Ġ o", "Ġ c", "i t", "a l",
    "Ġ b", "Ġ f", "o u", "Ġ p", "a r", "i c", "Ġ m", "l e", "Ġ d", "in g",
    "Ġ h", "e d", "Ġ l", "Ġ e", "o m", "Ġ in", "s t", "Ġ n", "a s", "Ġo f", "Ġa n",
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 256 + len(MERGES) + len(SPECIAL_TOKENS)
EOS_TOKEN_ID = 256 + len(MERGES)  # <|endoftext|>, also used as bos

HF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[b]) for b in range(256)]


def tokenizer_tokens() -> list[str]:
    """The token list: bytes, then one token per merge, then the control tokens."""
    tokens = byte_tokens()
    known = set(tokens)
    for merge in MERGES:
        left, right = merge.split(" ")
        if left not in known or right not in known:
            raise ValueError(f"merge {merge!r} uses a token that is not in the vocabulary yet")
        tokens.append(left + right)
        known.add(left + right)
    return [*tokens, *SPECIAL_TOKENS]


def write_tiny_llama_gguf(path: Path, rng: np.random.Generator, **shape: int) -> dict[str, np.ndarray]:
    """Write a random llama model with the tiny byte-level BPE tokenizer to `path` as an all-F32 GGUF file.

    `shape` takes `write_tiny_llama_model`'s hidden, layers, heads, kv_heads and intermediate.
    Returns the float32 weights it wrote under Hugging Face LlamaForCausalLM names and layouts
    (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ...,
    ``lm_head.weight``; untied embeddings), with Q and K in HF's rotary order. K-quant types need
    `hidden` and `intermediate` to be multiples of 256, the other block types multiples of 32.
    """
    return write_tiny_llama_model(path, rng, VOCAB_SIZE, add_tiny_tokenizer, **shape)


def add_tiny_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The tiny byte-level BPE tokenizer's keys (`tokenizer_tokens`, `MERGES`, control tokens)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokenizer_tokens())
    writer.add_token_types([int(gguf.TokenType.NORMAL)] * (VOCAB_SIZE - len(SPECIAL_TOKENS))
                           + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS))
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(EOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_add_bos_token(False)


def write_tiny_llama_model(
    path: Path,
    rng: np.random.Generator,
    vocab_size: int,
    add_tokenizer: Callable[[gguf.GGUFWriter], None],
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 512,
) -> dict[str, np.ndarray]:
    """`write_tiny_llama_gguf` with `vocab_size` embedding rows and the tokenizer keys `add_tokenizer` writes."""
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(f"bad shape: hidden={hidden}, heads={heads}, kv_heads={kv_heads}")
    head_dim = hidden // heads
    kv_dim = head_dim * kv_heads

    def linear(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    weights: dict[str, np.ndarray] = {"model.embed_tokens.weight": linear(vocab_size, hidden)}
    tensors: dict[str, np.ndarray] = {"token_embd.weight": weights["model.embed_tokens.weight"]}
    for n in range(layers):
        layer = {
            "attn_norm.weight": norm(hidden),
            "attn_q.weight": linear(hidden, hidden),
            "attn_k.weight": linear(kv_dim, hidden),
            "attn_v.weight": linear(kv_dim, hidden),
            "attn_output.weight": linear(hidden, hidden),
            "ffn_norm.weight": norm(hidden),
            "ffn_gate.weight": linear(intermediate, hidden),
            "ffn_up.weight": linear(intermediate, hidden),
            "ffn_down.weight": linear(hidden, intermediate),
        }
        for name, array in layer.items():
            weights[f"model.layers.{n}.{HF_NAMES[name]}"] = array
            if name == "attn_q.weight":
                array = permute_rotary(array, heads)
            elif name == "attn_k.weight":
                array = permute_rotary(array, kv_heads)
            tensors[f"blk.{n}.{name}"] = array
    weights["model.norm.weight"] = tensors["output_norm.weight"] = norm(hidden)
    weights["lm_head.weight"] = tensors["output.weight"] = linear(vocab_size, hidden)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(vocab_size)
    add_tokenizer(writer)
    finish_gguf(writer, [(name, array, gguf.GGMLQuantizationType.F32) for name, array in tensors.items()])
    return weights


def finish_gguf(writer: gguf.GGUFWriter, tensors) -> None:
    """Add (name, float array, GGML type) tensors, stored in that type, and write the file out."""
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for name, array, qtype in tensors:
        data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
        writer.add_tensor(name, data) if qtype in plain else writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
