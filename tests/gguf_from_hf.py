"""Writing a tiny Hugging Face model as a GGUF file the way llama.cpp's converter lays it out.

Metadata: the inverse of transformers' own GGUF key mapping for the architecture; tensors:
gguf-py's name map, with llama.cpp's layout changes (llama Q/K rows permuted, Gemma norms stored
as w + 1, GPT-2's Conv1D weights transposed, MoE experts split into gate/up/down stacks); the
tokenizer: the byte-level BPE vocabulary of `tiny_gguf`. Test support only.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tiny_gguf import EOS_TOKEN_ID, MERGES, SPECIAL_TOKENS, finish_gguf, permute_rotary, tokenizer_tokens
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

TABLE_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
VOCAB_SIZE = len(tokenizer_tokens())
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _config_value(config, attr: str):
    if attr == "rope_theta":
        return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    # fields some config classes spell their own way
    return getattr(config, attr, getattr(config, {"num_key_value_heads": "num_kv_heads", "n_ctx": "n_positions"}.get(attr, attr), None))


def _write_metadata(writer: gguf.GGUFWriter, arch: str, config) -> None:
    # Gemma (1) has Gemma 2's keys, less the sliding window (transformers' table has no entry for it)
    table = GGUF_CONFIG_MAPPING[TABLE_NAMES.get(arch, "gemma2" if arch == "gemma" else arch)]
    for key, attr in table.items():
        value = _config_value(config, attr) if isinstance(attr, str) else None
        if value is None or key == "vocab_size" or (arch == "gemma" and key == "attention.sliding_window"):
            continue
        name = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
    writer.add_vocab_size(config.vocab_size)
    # what llama.cpp's converter writes beyond transformers' table
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and f"{arch}.attention.key_length" not in writer.kv_data[0]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    renamed = {"moe_intermediate_size": "expert_feed_forward_length",
               "shared_expert_intermediate_size": "expert_shared_feed_forward_length"}  # fmt: skip
    for key in (*renamed, "attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(config, key, None)
        name = renamed.get(key, key)
        if value is not None:
            (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"{arch}.{name}", value)
    if getattr(config, "pad_token_id", None) is not None:
        writer.add_pad_token_id(config.pad_token_id)


def _write_tokenizer(writer: gguf.GGUFWriter) -> None:
    tokens = tokenizer_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS))
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(EOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID + 2)  # <|im_end|>
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _llama_cpp_tensors(model, arch: str) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, array) for every weight, in llama.cpp's layouts."""
    config = model.config
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)
    tied = config.tie_word_embeddings
    out = []
    for hf_name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        if base.endswith(".mlp.experts") or base.endswith(".experts"):  # fused 3-D experts
            layer = hf_name.split(".layers.")[1].split(".")[0]
            if suffix == "gate_up_proj":
                gate, up = np.split(array, 2, axis=1)
                out += [(f"blk.{layer}.ffn_gate_exps.weight", gate), (f"blk.{layer}.ffn_up_exps.weight", up)]
            else:
                out.append((f"blk.{layer}.ffn_down_exps.weight", array))
            continue
        gguf_name = name_map.get_name(base) if suffix in ("weight", "bias") else name_map.get_name(hf_name)
        assert gguf_name is not None, f"no llama.cpp name for {hf_name}"
        gguf_name = f"{gguf_name}.{suffix}" if suffix in ("weight", "bias") else gguf_name
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
            array = permute_rotary(array, heads)
        if arch == "falcon" and gguf_name.endswith("attn_qkv.weight"):
            array = _falcon_qkv(array, config)
        if arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            array = array + 1.0
        if arch == "gpt2" and array.ndim == 2 and gguf_name.startswith("blk.") and "norm" not in gguf_name:
            array = array.T  # Conv1D keeps (in, out)
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            array = array.reshape(-1)
        out.append((gguf_name, np.ascontiguousarray(array)))
    return out


def _falcon_qkv(array: np.ndarray, config) -> np.ndarray:
    """llama.cpp's FalconModel.modify_tensors: per-kv-group [q.., k, v] rows -> all q, all k, all v."""
    heads = config.num_attention_heads
    kv_heads = config.num_kv_heads if config.new_decoder_architecture else 1
    head_dim = config.hidden_size // heads
    qkv = array.reshape(kv_heads, heads // kv_heads + 2, head_dim, array.shape[1])
    q = qkv[:, :-2].reshape(heads * head_dim, -1)
    k = qkv[:, [-2]].reshape(kv_heads * head_dim, -1)
    v = qkv[:, [-1]].reshape(kv_heads * head_dim, -1)
    return np.concatenate([q, k, v])


def write_gguf_from_hf(model, path: Path, arch: str, name: str = "tiny", qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """Write `model` (a transformers causal LM) as a GGUF file of llama.cpp architecture `arch`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    _write_metadata(writer, arch, model.config)
    _write_tokenizer(writer)
    f32 = gguf.GGMLQuantizationType.F32
    finish_gguf(writer, [(n, a, f32 if a.ndim == 1 else qtype) for n, a in _llama_cpp_tensors(model, arch)])
    return path

