"""export_gguf: the fine-tuned model as one GGUF file that llama.cpp, Ollama and LM Studio run.

The model is written merged: every LoRA adapter folded into its base weight, and 4-bit (NF4/FP4)
bases dequantized first, one layer at a time (`merged.merged_tensors`), so the float model never
exists whole. Then, in llama.cpp's own terms:

- metadata: the architecture's hyperparameters under llama.cpp's key names (context length,
  widths, heads, norm epsilon, the rotary base and dimension count, rope scaling, head width,
  experts, Gemma's sliding window and soft-capping). `rope.freq_base` is always written, since
  llama.cpp falls back to 10000 silently without it;
- tensors: llama.cpp's names and layouts (`gguf_layout`);
- tensor types: those llama.cpp's `llama-quantize` would choose for the file type
  (`kquants.tensor_types`: Q6_K for the output head in a Q4_K_M file, F32 norms, fall-backs for
  rows that do not split into 256-blocks), quantized bit-exactly as llama.cpp does;
- the tokenizer (`gguf_vocab.add_tokenizer`): copied from the source GGUF file when the model
  came from one, else built from the Hugging Face tokenizer; always with the chat template the
  run trained with, and EOS/EOT ids that match its end-of-turn token, so generation stops.

The file is written in two passes over the merged tensors: the first collects names, shapes and
types (the header comes first in a GGUF file), the second quantizes and writes each tensor and
drops it. The output goes to a temporary name and is renamed at the end: an interrupted export
leaves no half-written file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..generate import END_OF_TURN_TOKENS
from ..progress import task
from .files import write_file
from .gguf_layout import Layout
from .gguf_vocab import add_tokenizer
from .kquants import FILE_TYPES, quantize_tensor, tensor_types
from .merged import merged_tensors
from .ollama_template import derive_pieces, effective_chat_template

log = logging.getLogger(__name__)

# llama.cpp architectures whose norms are RMSNorm (epsilon under `attention.layer_norm_rms_epsilon`)
_RMS_NORM = {"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3", "gemma", "gemma2", "gemma3"}
# rotary architectures that may rotate only part of each head (`partial_rotary_factor`)
_NO_ROPE = {"gpt2"}


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_parameters(config) -> dict:
    """The rotary settings of full-attention layers (Gemma 3 keeps one set per layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    if params.get("rope_type") is None and getattr(config, "rope_scaling", None):
        params.update(config.rope_scaling)
    return params


def _head_dim(config) -> int:
    heads = _get(config, "num_attention_heads", "n_head")
    hidden = _get(config, "hidden_size", "n_embd")
    return int(_get(config, "head_dim", default=hidden // heads))


def _kv_heads(config, arch: str) -> int:
    heads = _get(config, "num_attention_heads", "n_head")
    if arch == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return config.num_kv_heads
        return 1 if getattr(config, "multi_query", True) else heads
    return int(_get(config, "num_key_value_heads", default=heads))


def _check_llama_cpp_can_run(config, arch: str) -> None:
    """Refuse settings llama.cpp ignores for this architecture, which would change the outputs."""
    if arch in ("gemma2", "gemma3"):
        scalar = getattr(config, "query_pre_attn_scalar", None)
        head_dim = _head_dim(config)
        per_head = config.hidden_size // config.num_attention_heads
        if scalar is not None and scalar not in (head_dim, per_head):
            raise ExportError(
                f"this {arch} model scales attention by query_pre_attn_scalar={scalar}, but llama.cpp derives the "
                f"scale from the head width ({head_dim}) or hidden size / heads ({per_head}); the GGUF file would "
                "not compute what the model does"
            )


def write_metadata(writer: gguf.GGUFWriter, config, layout: Layout) -> None:
    """The architecture's hyperparameters under llama.cpp's keys."""
    arch = layout.arch
    _check_llama_cpp_can_run(config, arch)
    hidden = int(_get(config, "hidden_size", "n_embd"))
    heads = int(_get(config, "num_attention_heads", "n_head"))
    writer.add_context_length(int(_get(config, "max_position_embeddings", "n_positions", "n_ctx")))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layout.n_layer)
    writer.add_feed_forward_length(int(_get(config, "intermediate_size", "n_inner", "ffn_hidden_size",
                                            default=4 * hidden)))
    writer.add_head_count(heads)
    writer.add_head_count_kv(_kv_heads(config, arch))
    if arch in _RMS_NORM:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    else:
        writer.add_layer_norm_eps(float(_get(config, "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon")))
    head_dim = _head_dim(config)
    if head_dim != hidden // heads or arch.startswith(("gemma", "qwen3")):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch not in _NO_ROPE:
        _write_rope(writer, config, head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    if _get(config, "num_experts", "num_local_experts"):
        writer.add_expert_count(int(_get(config, "num_experts", "num_local_experts")))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if arch in ("gemma2", "gemma3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    window = getattr(config, "sliding_window", None)
    if arch == "llama" and window and window < int(_get(config, "max_position_embeddings", default=0)):
        log.warning("the model attends within a sliding window of %d tokens, which llama.cpp's llama architecture "
                    "does not apply: its outputs differ beyond %d tokens of context", window, window)
    if arch == "phi3":  # llama.cpp requires the key; no window is one as long as the context
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or config.max_position_embeddings))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    elif arch == "gemma3" and getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _write_rope(writer: gguf.GGUFWriter, config, head_dim: int) -> None:
    params = _rope_parameters(config)
    theta = params.get("rope_theta")
    if theta is None:
        raise ExportError("the model config has no rope_theta; llama.cpp would silently use 10000")
    writer.add_rope_freq_base(float(theta))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    writer.add_rope_dimension_count(int(head_dim * partial))
    kind = params.get("rope_type", "default")
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    elif kind != "llama3":  # llama3's factors go in as the rope_freqs tensor (_extra_tensors)
        raise ExportError(f"rope scaling {kind!r} cannot be written to GGUF by qlorafit (linear, yarn and llama3 can)")


def _llama3_rope_freqs(config, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3.1 scaling: the divisor of each rotary frequency
    (as its converter computes it from the config)."""
    p = _rope_parameters(config)
    base, factor = float(p["rope_theta"]), float(p["factor"])
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_context = float(p["original_max_position_embeddings"])
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _extra_tensors(config, layout: Layout) -> list[tuple[str, np.ndarray]]:
    if layout.arch == "llama" and _rope_parameters(config).get("rope_type") == "llama3":
        return [("rope_freqs.weight", _llama3_rope_freqs(config, _head_dim(config)))]
    return []


def end_of_turn_token(tokenizer, template: str) -> str | None:
    """The token that ends an assistant turn in `template` (`<|im_end|>`, `<|eot_id|>`, ...), if it
    is one token of the vocabulary: llama.cpp stops generating there."""
    try:
        stops = derive_pieces(tokenizer, template).end_of_turn
    except ExportError:  # a template Ollama cannot express still has an end of turn
        stops = tuple(t for t in END_OF_TURN_TOKENS if t in template)
    vocab = tokenizer.get_vocab()
    return next((t for t in stops if t in vocab), None)


def _source_gguf(model: nn.Module) -> Path | None:
    source = getattr(model, "qlorafit_source", None) or {}
    path = source.get("path") if isinstance(source, dict) else None
    return Path(path) if path and source.get("kind") == "gguf" and Path(path).is_file() else None


def _model_tensors(model: nn.Module, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    def hf() -> Iterator[tuple[str, np.ndarray]]:
        for key, tensor in merged_tensors(model, torch.float32):
            if tensor.is_floating_point():
                yield key, tensor.detach().to("cpu", torch.float32).numpy()

    yield from layout.tensors(hf())
    yield from _extra_tensors(model.config, layout)


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    type: str = "q8_0",  # noqa: A002 - the user-facing name of the setting
    *,
    chat_template: str | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` (LoRA merged, 4-bit bases dequantized) as a GGUF file for llama.cpp / Ollama.

    `type` is the file type: f32, f16, bf16, q8_0, q4_0 or q4_k_m (and the others `kquants.FILE_TYPES`
    lists), with llama.cpp's own per-tensor choices. `chat_template` is the template the run trained
    with (default: the tokenizer's, or qlorafit's fallback when it has none). Returns the path.
    """
    file_type = type.lower()
    if file_type not in FILE_TYPES:
        raise ExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(FILE_TYPES)}")
    if tokenizer is None:
        raise ExportError("a GGUF file needs the model's tokenizer; pass the tokenizer load_model returned")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the GGUF file's path, e.g. {path / 'model.gguf'}")
    layout = Layout(model.config)
    if layout.arch == "phi3" and "<|endoftext|>" not in tokenizer.get_vocab():
        raise ExportError("llama.cpp loads a phi3 file only when its vocabulary has Phi-3's <|endoftext|> token, "
                          "which this tokenizer lacks")
    template = effective_chat_template(tokenizer, chat_template)
    eot = end_of_turn_token(tokenizer, template)
    shapes = [(n, tuple(a.shape)) for n, a in _model_tensors(model, layout)]
    types = tensor_types(shapes, file_type, arch=layout.arch, n_expert=int(_get(model.config, "num_experts",
                                                                                 "num_local_experts", default=0)),
                         n_head=int(_get(model.config, "num_attention_heads", "n_head")),
                         n_head_kv=_kv_heads(model.config, layout.arch), n_layer=layout.n_layer)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), layout.arch)
        writer.add_name(name or Path(getattr(model, "name_or_path", "") or "model").name or "model")
        writer.add_file_type(FILE_TYPES[file_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_metadata(writer, model.config, layout)
        add_tokenizer(writer, tokenizer, chat_template=template, source_gguf=_source_gguf(model), eot_token=eot,
                      vocab_size=int(model.config.vocab_size))
        for gguf_name, shape in shapes:  # every type as the raw bytes quantize_tensor returns
            byte_shape = gguf.quant_shape_to_byte_shape(shape, types[gguf_name])
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=types[gguf_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with task(f"exporting {path.name} ({file_type})", len(shapes), "tensor") as bar:
            for (gguf_name, shape), (again, array) in zip(shapes, _model_tensors(model, layout), strict=True):
                if again != gguf_name or tuple(array.shape) != shape:
                    raise ExportError(f"the model changed while it was exported ({gguf_name} -> {again})")
                writer.write_tensor_data(quantize_tensor(array, types[gguf_name]))
                bar.update()
        writer.close()

    with torch.no_grad():
        write_file(path, write)
    log.info("wrote %s (%s, %d tensors)", path, file_type, len(shapes))
    return path
