"""Where each weight of a Hugging Face model goes in a llama.cpp GGUF file, and in which layout.

llama.cpp names its tensors its own way (`blk.3.attn_q.weight`, `output.weight`) and stores a few
of them differently from transformers. Both the merged-model export and the LoRA-adapter export
need the same answers, so they live here:

- the architecture: llama.cpp's name for a transformers `model_type` (Mistral is written as
  llama, as llama.cpp's converter does), and the architectures llama.cpp runs from such a file;
- tensor names: the `gguf` package's own name map (`gguf.get_tensor_name_map`), the table
  llama.cpp's converter uses;
- layouts, the inverse of what the loader (`models/gguf.py`, through transformers' processors)
  undoes: the Q and K rows of llama-family models permuted into llama.cpp's interleaved rotary
  order, Gemma's RMSNorm weights stored as `1 + w`, GPT-2's Conv1D weights transposed, Falcon's
  fused QKV rows regrouped, and fused MoE experts split into llama.cpp's gate/up/down stacks.

A permutation of a weight's rows (Q/K, Falcon's QKV) applies to a LoRA `B` matrix the same way,
since `W + s B A` has the rows of `B`; `rows_of` says which row transform a weight gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gguf
import numpy as np

from ..errors import ExportError

# transformers model_type -> llama.cpp architecture, for the architectures this export writes
# and llama.cpp runs; checked end to end in tests/export/test_gguf_export.py
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "starcoder2": "starcoder2",
    "stablelm": "stablelm",
    "gpt2": "gpt2",
    "falcon": "falcon",
}

# architectures whose Q/K rows llama.cpp stores in its interleaved (GPT-J style) rotary order
_PERMUTED_QK = {"llama"}


def architecture(config) -> str:
    """llama.cpp's architecture for `config`, or an ExportError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export does not support model type {model_type!r}; it writes "
            f"{', '.join(sorted(set(ARCHITECTURES)))}. Save a Hugging Face folder with `qlorafit merge` "
            "and convert it with llama.cpp's convert_hf_to_gguf.py instead."
        )
    return arch


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def permute_rotary(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved order (its converter's `permute`)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _falcon_qkv_rows(rows: np.ndarray, config) -> np.ndarray:
    """Falcon's fused QKV rows, grouped per kv head in transformers -> all q, all k, all v."""
    heads = config.num_attention_heads
    kv_heads = config.num_kv_heads if config.new_decoder_architecture else 1
    head_dim = config.hidden_size // heads
    qkv = rows.reshape(kv_heads, heads // kv_heads + 2, head_dim, *rows.shape[1:])
    q = qkv[:, :-2].reshape(heads * head_dim, *rows.shape[1:])
    k = qkv[:, [-2]].reshape(kv_heads * head_dim, *rows.shape[1:])
    v = qkv[:, [-1]].reshape(kv_heads * head_dim, *rows.shape[1:])
    return np.concatenate([q, k, v])


class Layout:
    """The GGUF names and layouts of one model's weights."""

    def __init__(self, config) -> None:
        self.config = config
        self.arch = architecture(config)
        self.n_layer = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
        self.names = gguf.get_tensor_name_map(_arch_enum(self.arch), self.n_layer)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def name(self, key: str) -> str | None:
        """The llama.cpp name of the HF tensor `key` (None for a tensor the file leaves out)."""
        if self.tied and key == "lm_head.weight":
            return None  # llama.cpp reads the embedding when output.weight is absent
        base, _, suffix = key.rpartition(".")
        if suffix in ("weight", "bias"):
            found = self.names.get_name(base)
            return f"{found}.{suffix}" if found else None
        return self.names.get_name(key)

    def rows_of(self, gguf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
        """The row transform a weight (and a LoRA B on it) gets in llama.cpp's layout, if any."""
        config = self.config
        if self.arch in _PERMUTED_QK and gguf_name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                               "attn_k.bias")):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
            return lambda rows: permute_rotary(rows, heads)
        if self.arch == "falcon" and gguf_name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
            return lambda rows: _falcon_qkv_rows(rows, config)
        return None

    def tensors(self, items: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        """(llama.cpp name, float32 array in llama.cpp's layout) for HF (key, array) pairs."""
        for key, array in items:
            base, _, suffix = key.rpartition(".")
            if base.endswith("experts") and suffix in ("gate_up_proj", "down_proj", "gate_proj", "up_proj"):
                yield from self._experts(key, array)
                continue
            gguf_name = self.name(key)
            if gguf_name is None:
                if self.tied and key == "lm_head.weight":
                    continue
                if key.endswith(("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")):
                    continue  # buffers llama.cpp recomputes
                raise ExportError(f"weight {key} has no place in a llama.cpp {self.arch} file; "
                                  "GGUF export cannot write this model")
            yield gguf_name, np.ascontiguousarray(self._layout(gguf_name, array))

    def _layout(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        rows = self.rows_of(gguf_name)
        if rows is not None:
            array = rows(array)
        if self.arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            array = array + np.float32(1.0)  # HF computes x * (1 + w); llama.cpp x * w
        if self.arch == "gpt2" and array.ndim == 2 and gguf_name.startswith("blk."):
            array = array.T  # Conv1D keeps (in, out)
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            array = array.reshape(-1)
        return array

    def _experts(self, key: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        layer = key.split(".layers.")[1].split(".")[0]
        suffix = key.rpartition(".")[2]
        if suffix == "gate_up_proj":
            gate, up = np.split(array, 2, axis=1)
            yield f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate)
            yield f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(up)
        else:
            part = {"down_proj": "down", "gate_proj": "gate", "up_proj": "up"}[suffix]
            yield f"blk.{layer}.ffn_{part}_exps.weight", np.ascontiguousarray(array)

