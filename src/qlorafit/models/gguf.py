"""Reading GGUF files (llama.cpp's format) as Hugging Face transformers configs, weights and tokenizers.

A GGUF file holds everything a model needs: the hyper-parameters and the tokenizer as metadata
key/values under llama.cpp's names, and the tensors under llama.cpp's names, in llama.cpp's
layouts, mostly as quantized blocks. This module turns them into what transformers expects:

- `gguf_config`: a `LlamaConfig` / `Qwen2Config` built from the metadata, so the model can be
  created on the meta device without a `config.json`;
- `iter_gguf_tensors`: the weights, one float32 tensor at a time, under Hugging Face parameter
  names, dequantized with vectorised torch code (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1;
  any other type through `gguf.quants.dequantize`), so the caller can quantize each weight as it
  arrives and the whole float model never exists at once;
- `gguf_tokenizer`: the tokenizer, built by transformers from the metadata, offline.

The file is memory-mapped by `gguf.GGUFReader`; only the tensor being converted is read.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.gguf_reader import ReaderTensor

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> the transformers config class its tensors fit.
# Mistral files converted by llama.cpp say `llama`: same layers, same names, same Q/K permutation,
# so they load as a LlamaConfig (GGUF does not record Mistral's sliding window).
_CONFIG_CLASSES: dict[str, type[transformers.PretrainedConfig]] = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
}
SUPPORTED_ARCHITECTURES = tuple(_CONFIG_CLASSES)

# Architectures whose Q and K projections llama.cpp's converter permuted for its rotary layout.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama"})

# llama.cpp tensor names -> Hugging Face module names (".weight"/".bias" carried over as is).
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR_RE = re.compile(r"(\w+)\.(weight|bias)")
# Tensors llama.cpp writes that have no Hugging Face parameter.
_IGNORED_TENSORS = {
    "rope_freqs.weight": "Llama 3 rope frequency factors, which the config does not carry: the model "
    "runs with unscaled rope, so its outputs differ somewhat from llama.cpp's",
}

# Elements dequantized per step: bounds the temporaries to a few times 16 MB on any tensor size.
_CHUNK_ELEMENTS = 1 << 22

_MISSING = object()


# --------------------------------------------------------------------------------------------
# Opening the file


def _corrupt_error(path: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: not a readable GGUF file, it is truncated or corrupt ({type(exc).__name__}: {exc}). "
        "Re-download it or re-convert it with llama.cpp's convert_hf_to_gguf.py."
    )


@functools.lru_cache(maxsize=2)
def _cached_reader(resolved: str, size: int, mtime_ns: int) -> GGUFReader:
    # Parsing the metadata of a file with a 50k-token vocabulary takes seconds (one Python call
    # per string), so the config, the tensors and the tokenizer share one reader per file version.
    try:
        reader = GGUFReader(resolved)
    except Exception as exc:  # GGUFReader fails with ValueError, IndexError, KeyError, ... on bad bytes
        raise _corrupt_error(resolved, exc) from exc
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise _corrupt_error(
                resolved, EOFError(f"tensor {tensor.name!r} ends at byte {end}, the file has {size}")
            )
    if reader.byte_order != "I":
        raise ModelLoadError(
            f"{resolved}: a big-endian GGUF file, which qlorafit does not read. "
            "Convert the model again without --bigendian."
        )
    return reader


def _open_reader(path: str | Path) -> tuple[Path, GGUFReader]:
    """The path and a (shared, memory-mapped) reader of the GGUF file at `path`."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such GGUF file. Check the path.") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the GGUF file ({exc}). Check its permissions.") from exc
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file. Give the path of the .gguf file itself.")
    resolved = path.resolve()
    return resolved, _cached_reader(str(resolved), stat.st_size, stat.st_mtime_ns)


def _metadata(reader: GGUFReader, path: Path, key: str, default: Any = _MISSING) -> Any:
    """The value of metadata `key` (str, number, bool or list), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ModelLoadError(
                f"{path}: the GGUF metadata has no {key!r}. The file is incomplete or was not written "
                "by llama.cpp's converter; re-convert the model."
            )
        return default
    try:
        return field.contents()
    except Exception as exc:
        raise _corrupt_error(str(path), exc) from exc


# --------------------------------------------------------------------------------------------
# Config


def _architecture(reader: GGUFReader, path: Path) -> str:
    architecture = _metadata(reader, path, "general.architecture")
    if architecture not in _CONFIG_CLASSES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {architecture!r} is not supported; qlorafit reads GGUF files of "
            f"architecture {', '.join(SUPPORTED_ARCHITECTURES)}. Load the model from its Hugging Face "
            "folder instead."
        )
    return architecture


def _single_count(value: Any, key: str, path: Path) -> int:
    """A head count that may be written per layer: the one value all layers share."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(
                f"{path}: {key!r} differs between layers ({value}); qlorafit supports uniform layers only."
            )
        value = value[0]
    return int(value)


def _vocab_size(reader: GGUFReader, path: Path, architecture: str) -> int:
    """The embedding's row count: the vocab_size key, else the length of the token list."""
    vocab_size = _metadata(reader, path, f"{architecture}.vocab_size", None)
    if vocab_size is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(
                f"{path}: the GGUF metadata has neither {architecture + '.vocab_size'!r} nor a token list. "
                "Re-convert the model."
            )
        vocab_size = len(tokens.data)  # one entry per token: no need to decode the strings
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is not None and int(embedding.shape[-1]) != vocab_size:
        # ne[1] of the embedding is its row count; the weights decide, since they must fit the model
        logger.warning(
            "%s: vocab size %d from the metadata differs from the %d embedding rows; using the latter",
            path, vocab_size, int(embedding.shape[-1]),
        )
        vocab_size = int(embedding.shape[-1])
    return int(vocab_size)


def _rope_parameters(reader: GGUFReader, path: Path, architecture: str) -> dict[str, Any]:
    """transformers' `rope_parameters` from llama.cpp's rope keys."""

    def key(name: str, default: Any = _MISSING) -> Any:
        return _metadata(reader, path, f"{architecture}.rope.{name}", default)

    parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("freq_base", 10000.0))}
    scaling = key("scaling.type", None)
    if scaling in (None, "none"):
        return parameters
    if scaling == "linear":
        return parameters | {"rope_type": "linear", "factor": float(key("scaling.factor"))}
    if scaling == "yarn":
        return parameters | {
            "rope_type": "yarn",
            "factor": float(key("scaling.factor")),
            "original_max_position_embeddings": int(key("scaling.original_context_length")),
        }
    raise ModelLoadError(
        f"{path}: rope scaling {scaling!r} is not supported (only linear and yarn). "
        "Load the model from its Hugging Face folder instead."
    )


def _config_from_reader(reader: GGUFReader, path: Path) -> transformers.PretrainedConfig:
    architecture = _architecture(reader, path)
    try:
        return _CONFIG_CLASSES[architecture](**_config_kwargs(reader, path, architecture))
    except (TypeError, ValueError) as exc:  # a value of the wrong kind under a known key
        raise ModelLoadError(
            f"{path}: the GGUF metadata does not describe a valid {architecture} model ({exc}). "
            "The file is corrupt: re-download it or re-convert it."
        ) from exc


def _config_kwargs(reader: GGUFReader, path: Path, architecture: str) -> dict[str, Any]:
    """The config class's arguments, from llama.cpp's metadata keys."""

    def key(name: str, default: Any = _MISSING) -> Any:
        return _metadata(reader, path, f"{architecture}.{name}", default)

    tensor_names = {tensor.name for tensor in reader.tensors}
    heads = int(key("attention.head_count"))
    kwargs: dict[str, Any] = {
        "architectures": [_CONFIG_CLASSES[architecture].__name__.replace("Config", "ForCausalLM")],
        "vocab_size": _vocab_size(reader, path, architecture),
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": _single_count(key("attention.head_count_kv", heads), "head_count_kv", path),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope_parameters(reader, path, architecture),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _metadata(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _metadata(reader, path, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _metadata(reader, path, "tokenizer.ggml.padding_token_id", None),
        "dtype": torch.float32,
    }
    # the per-head width, where it is not hidden_size / heads (Mistral Nemo, for one)
    head_dim = key("attention.key_length", None)
    if architecture == "llama":
        # llama rotates the whole head, so the rotary width is the head width
        head_dim = head_dim if head_dim is not None else key("rope.dimension_count", None)
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if head_dim is not None:
        kwargs["head_dim"] = int(head_dim)
    return kwargs


def gguf_config(path: str | Path) -> transformers.PretrainedConfig:
    """The transformers config of the GGUF model at `path`, built from its metadata (float32)."""
    resolved, reader = _open_reader(path)
    return _config_from_reader(reader, resolved)


# --------------------------------------------------------------------------------------------
# Dequantization: uint8 blocks (n_blocks, type_size) -> float32 (n_blocks, block_size)


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


_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F32: lambda blocks: blocks.view(torch.float32),
    GGMLQuantizationType.F16: lambda blocks: blocks.view(torch.float16).float(),
    GGMLQuantizationType.BF16: lambda blocks: blocks.view(torch.bfloat16).float(),
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q5_0: _dequantize_q5_0,
    GGMLQuantizationType.Q5_1: _dequantize_q5_1,
}


def _dequantize_with_gguf(qtype: GGMLQuantizationType) -> Callable[[torch.Tensor], torch.Tensor]:
    """gguf-py's numpy dequantizer for a type we have no torch code for (K-quants, IQ types)."""

    def dequantize(blocks: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), qtype))

    return dequantize


def dequantize_gguf_data(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The float32 values of GGUF tensor data `data` (its raw bytes, any shape) of type `qtype`, flat."""
    if qtype not in GGML_QUANT_SIZES:
        raise ModelLoadError(f"unknown GGML tensor type {qtype!r}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    dequantize = _DEQUANTIZERS.get(qtype) or _dequantize_with_gguf(qtype)
    raw = np.asarray(data).reshape(-1).view(np.uint8)  # a view of the memory map: nothing read yet
    n_blocks = raw.size // type_size
    out = torch.empty(n_blocks * block_size, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        # copy this chunk out of the memory map (torch wants writable memory), then decode it
        blocks = torch.from_numpy(raw[start * type_size : stop * type_size].copy()).view(stop - start, type_size)
        out[start * block_size : stop * block_size] = dequantize(blocks).reshape(-1)
    return out


def _dequantize_tensor(tensor: ReaderTensor, path: Path) -> torch.Tensor:
    """A GGUF tensor as float32 in torch order: GGUF lists dims innermost first, torch outermost first."""
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    try:
        values = dequantize_gguf_data(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be dequantized "
            "here. Re-convert the model to a common type (Q8_0, Q4_K_M, F16)."
        ) from exc
    return values.reshape(shape)


# --------------------------------------------------------------------------------------------
# Names and layouts


def _hf_name(gguf_name: str, path: Path) -> str | None:
    """The Hugging Face parameter name of a llama.cpp tensor name; None for tensors HF has no use for."""
    if gguf_name in _IGNORED_TENSORS:
        logger.warning("%s: ignoring tensor %s (%s)", path, gguf_name, _IGNORED_TENSORS[gguf_name])
        return None
    if (match := _LAYER_TENSOR_RE.fullmatch(gguf_name)) and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    if (match := _GLOBAL_TENSOR_RE.fullmatch(gguf_name)) and match[1] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[match[1]]}.{match[2]}"
    raise ModelLoadError(
        f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart that qlorafit knows; the file is "
        "a variant of its architecture that qlorafit does not support. Load the model from its "
        "Hugging Face folder instead."
    )


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs) back to Hugging Face's half-split."""
    # Per head of width d, HF keeps the rotary pairs as (j, j + d/2); llama.cpp's converter
    # reorders rows so they sit next to each other: GGUF row 2j + t is HF row t * d/2 + j.
    # Seen as (heads, d/2, 2), swapping the last two axes gives back (heads, 2, d/2), HF's order.
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _convert_tensors(
    named: list[tuple[ReaderTensor, str]], path: Path, architecture: str, config: transformers.PretrainedConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    permuted_heads = {}
    if architecture in _PERMUTED_QK_ARCHITECTURES:
        permuted_heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for tensor, name in named:
        weight = _dequantize_tensor(tensor, path)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind in permuted_heads:  # weights and biases alike: llama.cpp permuted both
            weight = unpermute_rotary(weight, permuted_heads[kind])
        logger.debug("%s: %s (%s) -> %s %s", path, tensor.name, tensor.tensor_type.name, name, tuple(weight.shape))
        yield name, weight


def iter_gguf_tensors(
    path: str | Path, config: transformers.PretrainedConfig | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, float32 tensor in HF shape) for the GGUF model at `path`, one at a time."""
    # Not a generator itself: a missing, corrupt or unsupported file raises here, at the call,
    # before any tensor is read.
    resolved, reader = _open_reader(path)
    architecture = _architecture(reader, resolved)
    if config is None:
        config = _config_from_reader(reader, resolved)
    named = [(tensor, name) for tensor in reader.tensors if (name := _hf_name(tensor.name, resolved))]
    logger.info("%s: reading %d %s tensors", resolved, len(named), architecture)
    return _convert_tensors(named, resolved, architecture, config)


# --------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_from_metadata(resolved: Path) -> transformers.PreTrainedTokenizerBase:
    """Build the tokenizer with transformers' GGUF converter, reading only the tokenizer arrays.

    `AutoTokenizer.from_pretrained(gguf_file=...)` parses the whole metadata a second time to
    build a config first (about 3x slower); its converter is used directly when available.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:  # another transformers layout: the public route (local_files_only: no hub)
        return transformers.AutoTokenizer.from_pretrained(
            str(resolved.parent), gguf_file=resolved.name, local_files_only=True
        )
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(resolved))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def gguf_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF metadata at `path`, with its chat template and a pad token; offline."""
    # the whole file is checked first (cheap once the config or tensors were read): a truncated
    # file fails here rather than after a tokenizer was built from its intact metadata
    resolved, reader = _open_reader(path)
    try:
        tokenizer = _tokenizer_from_metadata(resolved)
    except Exception as exc:
        raise ModelLoadError(
            f"{resolved}: cannot build a tokenizer from the GGUF metadata ({type(exc).__name__}: {exc}). "
            "Load the tokenizer from the model's Hugging Face folder instead."
        ) from exc
    if tokenizer.chat_template is None:  # transformers reads it too; this covers versions that do not
        template = _metadata(reader, resolved, "tokenizer.chat_template", None)
        if template is not None:
            tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
