"""Reading GGUF files (llama.cpp's format) as Hugging Face transformers configs, weights and tokenizers.

A GGUF file holds everything a model needs: the hyper-parameters and the tokenizer as metadata
key/values under llama.cpp's names, and the tensors under llama.cpp's names, in llama.cpp's
layouts, mostly as quantized blocks. transformers knows how to turn each architecture's file into
its own model (`transformers.integrations.ggml` for the config keys,
`transformers.modeling_gguf_pytorch_utils` for tensor names and per-architecture layouts: llama's
Q/K un-permutation, Gemma's norm offset, Bloom's fused QKV, MoE expert stacking), but it reads
the whole model into memory first. This module uses those tables and processors and adds what
they lack:

- `gguf_config`: the transformers config, from transformers' fast metadata reader (the
  vocabulary is counted, not decoded) and its key mapping;
- `iter_gguf_tensors`: the weights, one float32 tensor at a time under Hugging Face names, each
  dequantized (`ggml.py`) and passed through transformers' processor for its architecture as it
  is read, so the caller can quantize it on arrival and the float model never exists at once;
- `gguf_tokenizer`: the tokenizer transformers builds from the metadata, offline.

Only the header is memory-mapped; each tensor is read, converted and released in turn.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
from transformers.integrations.gguf import reader as hf_gguf_reader
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    Gemma2TensorProcessor,
    GGUFTensor,
    TensorProcessor,
    get_gguf_hf_weights_map,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import ModelLoadError
from .ggml import dequantize_gguf_data, type_name, type_sizes

logger = logging.getLogger(__name__)

# Gemma (the first one) is missing from transformers' tables: its file has Gemma 2's keys but no
# sliding window, and the same `w + 1` norms.
_CONFIG_MAPPING = GGUF_CONFIG_MAPPING | {
    "gemma": {k: v for k, v in GGUF_CONFIG_MAPPING["gemma2"].items() if k != "attention.sliding_window"}
}


class FalconTensorProcessor(TensorProcessor):
    """Falcon-40B/180B: llama.cpp stores the fused QKV rows as all queries, all keys, all values;
    transformers groups them per key/value head (that group's queries, its key, its value)."""

    def process(self, weights, name, **kwargs):
        if "attn_qkv" in name and self.config.get("new_decoder_architecture"):
            heads, kv_heads = self.config["num_attention_heads"], self.config["num_kv_heads"]
            head_dim = weights.shape[0] // (heads + 2 * kv_heads)
            rest = weights.shape[1:]
            q, k, v = np.split(weights, [heads * head_dim, (heads + kv_heads) * head_dim])
            grouped = np.concatenate(
                [
                    q.reshape(kv_heads, heads // kv_heads, head_dim, *rest),
                    k.reshape(kv_heads, 1, head_dim, *rest),
                    v.reshape(kv_heads, 1, head_dim, *rest),
                ],
                axis=1,
            )
            weights = grouped.reshape(weights.shape)
        return GGUFTensor(weights, name, {})


_PROCESSORS = TENSOR_PROCESSORS | {"gemma": Gemma2TensorProcessor, "falcon": FalconTensorProcessor}
# llama.cpp keys that transformers' table leaves out for some architectures, and the config field
# each sets; used only where the table does not map the key and the config class has the field
_EXTRA_KEYS = {
    "attention.key_length": "head_dim",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
_EXTRA_KEYS_BY_ARCHITECTURE = {
    "gpt2": {"context_length": "n_positions"},
    "falcon": {"attention.head_count_kv": "num_kv_heads"},
}
# GGUF architecture -> the name transformers' tables use for it, where they differ
_TABLE_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
# transformers' table name -> model_type, where they differ (GGUF files hold only the text model)
_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
# sections of transformers' mapping that are no architecture, or no causal LM
_NOT_MODELS = {"general", "tokenizer", "t5", "umt5"}
SUPPORTED_ARCHITECTURES = tuple(
    sorted(
        {v: k for k, v in _TABLE_NAMES.items()}.get(table, table)
        for table in _CONFIG_MAPPING
        if table not in _NOT_MODELS and _MODEL_TYPES.get(table, table) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
)


# --------------------------------------------------------------------------------------------
# Opening the file


@dataclass(frozen=True)
class GgufTensor:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    shape: tuple[int, ...]  # torch order (outermost first); GGUF lists dims innermost first
    qtype: int
    start: int  # byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GgufFile:
    """A parsed GGUF file: metadata (string arrays as their lengths) and tensor table."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GgufTensor, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def data(self, tensor: GgufTensor) -> np.ndarray:
        """The tensor's raw bytes, read into memory of their own.

        Plain reads, not a memory map: a map would keep every page read so far in the process's
        resident memory for as long as it stays open (the whole file, after a load).
        """
        data = np.empty(tensor.nbytes, dtype=np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(tensor.start)
                complete = f.readinto(memoryview(data)) == tensor.nbytes
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read tensor {tensor.name!r} ({exc})") from exc
        if not complete:
            raise _corrupt_error(self.path, f"tensor {tensor.name!r} is cut short")
        return data


def _corrupt_error(path: Path | str, exc: BaseException | str) -> ModelLoadError:
    what = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return ModelLoadError(
        f"{path}: not a readable GGUF file, it is truncated or corrupt ({what}). "
        "Re-download it or re-convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def _tensor_table(path: Path, blob: np.ndarray, count: int, pos: int, alignment: int) -> tuple[GgufTensor, ...]:
    entries, pos = hf_gguf_reader._read_tensor_table(blob, count, pos)
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, qtype, offset in entries:
        sizes = type_sizes(qtype)
        if sizes is None:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has GGML {type_name(qtype)}, which the installed gguf package does not "
                "know. Upgrade gguf, or re-convert the model to a common type (Q8_0, Q4_K_M, F16)."
            )
        numel = int(np.prod(shape, dtype=np.int64))
        if numel % sizes[0]:
            raise _corrupt_error(path, f"tensor {name!r} has {numel} values, not whole {type_name(qtype)} blocks")
        start, nbytes = data_start + offset, numel // sizes[0] * sizes[1]
        if start + nbytes > blob.size:
            raise _corrupt_error(path, f"tensor {name!r} ends at byte {start + nbytes}, the file has {blob.size}")
        tensors.append(GgufTensor(name, tuple(int(n) for n in shape), int(qtype), start, nbytes))
    return tuple(tensors)


@functools.lru_cache(maxsize=2)
def _cached_file(resolved: str, size: int, mtime_ns: int) -> GgufFile:
    path = Path(resolved)
    if size < 24:
        raise _corrupt_error(path, f"{size} bytes is too short for a GGUF header")
    blob = np.memmap(resolved, mode="r", dtype=np.uint8)  # for the header only: released after parsing
    if bytes(blob[:4]) == b"GGUF" and struct.unpack_from(">I", blob, 4)[0] in (2, 3):
        raise ModelLoadError(
            f"{path}: a big-endian GGUF file, which qlorafit does not read. Convert the model again without --bigendian."
        )
    try:
        metadata, count, pos = hf_gguf_reader._read_metadata(blob, resolved)
        if count > size:
            raise ValueError(f"{count} tensors cannot fit in {size} bytes")
        alignment = int(metadata.get("general.alignment", 32))
        tensors = _tensor_table(path, blob, count, pos, alignment)
    except ModelLoadError:
        raise
    except Exception as exc:  # struct.error, ValueError, UnicodeDecodeError, ... on bad bytes
        raise _corrupt_error(path, exc) from exc
    return GgufFile(path, metadata, tensors)


def open_gguf(path: str | Path) -> GgufFile:
    """The parsed GGUF file at `path` (shared between calls while the file is unchanged)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such GGUF file. Check the path.") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the GGUF file ({exc}). Check its permissions.") from exc
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file. Give the path of the .gguf file itself.")
    return _cached_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# Config: transformers' key mapping over the fast metadata


def _architectures(file: GgufFile) -> tuple[str, str]:
    """(the file's architecture, the name transformers' tables use for it)."""
    architecture = file.architecture
    name = file.metadata.get("general.name") or ""
    updated = _TABLE_NAMES.get(architecture, architecture)
    if architecture == "llama" and "mistral" in name.lower():
        updated = "mistral"  # llama.cpp writes Mistral models as llama: same layers and layout
    model_type = _MODEL_TYPES.get(updated, updated)
    if updated not in _CONFIG_MAPPING or updated in _NOT_MODELS or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{file.path}: GGUF architecture {architecture!r} is not one transformers can build a causal LM from; "
            f"qlorafit reads GGUF files of architecture {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Load the model from its Hugging Face folder instead."
        )
    return architecture, updated


def _scalar(value: Any) -> Any:
    """A value written per layer (a list) that is the same for every layer, as one value."""
    return value[0] if isinstance(value, list) and value and len(set(value)) == 1 else value


def _config_dict(file: GgufFile) -> dict[str, Any]:
    """The config as transformers' GGUF loader builds it (`load_gguf_checkpoint`), from the fast metadata."""
    architecture, updated = _architectures(file)
    tensor_names = {t.name for t in file.tensors}
    config: dict[str, Any] = {}
    if architecture == "stablelm":
        config["use_qkv_bias"] = any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in tensor_names)
        config["use_parallel_residual"] = not any("ffn_norm" in n for n in tensor_names)
    if architecture == "falcon":  # Falcon-40B/180B layout: separate attention and MLP norms (llama.cpp's test)
        config["new_decoder_architecture"] = "blk.0.attn_norm_2.weight" in tensor_names
    config["tie_word_embeddings"] = "output.weight" not in tensor_names or architecture in ("falcon", "bloom")
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, {}).items():
        config.setdefault(key, value)
    for gguf_key, value in file.metadata.items():
        prefix, _, rest = gguf_key.replace(architecture, updated, 1).partition(".")
        target = _CONFIG_MAPPING.get(prefix, {}).get(rest) if prefix in (updated, "general", "tokenizer") else None
        if target is None or target == -1:
            continue
        if prefix == updated and isinstance(value, str):
            raise _corrupt_error(file.path, f"metadata {gguf_key!r} is the text {value!r} where a number belongs")
        config[target] = _scalar(value)
    config["model_type"] = _MODEL_TYPES.get(updated, updated)
    _add_extra_keys(file, architecture, updated, config)
    _architecture_specifics(config)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in file.metadata:
        config["vocab_size"] = file.metadata["tokenizer.ggml.tokens"]  # the reader counts string arrays
    _reconcile_vocab(file, config)
    _add_rope_scaling(file, architecture, config)
    return config


def _add_extra_keys(file: GgufFile, architecture: str, updated: str, config: dict[str, Any]) -> None:
    """Sizes llama.cpp writes that transformers' table does not read (a Qwen3 head width, MoE widths, ...)."""
    table = _CONFIG_MAPPING[updated]
    defaults = transformers.CONFIG_MAPPING[config["model_type"]]().to_dict()
    for key, field in (_EXTRA_KEYS | _EXTRA_KEYS_BY_ARCHITECTURE.get(architecture, {})).items():
        value = file.metadata.get(f"{architecture}.{key}")
        if value is not None and table.get(key) not in defaults and field in defaults:
            config[field] = _scalar(value)


def _architecture_specifics(config: dict[str, Any]) -> None:
    """The per-architecture fixes transformers' `load_gguf_checkpoint` applies after the key mapping."""
    model_type = config["model_type"]
    if model_type in ("gemma2", "gemma3_text"):
        # llama.cpp scales attention by the head width, or by hidden size / heads for the 27B models;
        # the file has no query_pre_attn_scalar, and transformers' default (256) holds only for some sizes
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        big = config["num_hidden_layers"] == (46 if model_type == "gemma2" else 62)
        config["query_pre_attn_scalar"] = config["hidden_size"] // heads if big else head_dim
    if model_type == "gemma4_text":
        config["eos_token_id"] = [1, 106, 50]  # all three end-of-generation tokens
    elif model_type == "minimax_m2" and isinstance(config.get("scoring_func"), int):
        config["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(config["scoring_func"], "softmax")
    elif model_type == "lfm2" and isinstance(config.get("num_key_value_heads"), list):
        # one count per layer, zero on the convolution layers
        kv_heads = config["num_key_value_heads"]
        config["num_key_value_heads"] = max(kv_heads)
        config["full_attn_idxs"] = [i for i, n in enumerate(kv_heads) if n > 0]
        config["block_auto_adjust_ff_dim"] = False


def _reconcile_vocab(file: GgufFile, config: dict[str, Any]) -> None:
    """The embedding's row count decides the vocabulary size when the metadata says otherwise."""
    embedding = next((t for t in file.tensors if t.name == "token_embd.weight"), None)
    if embedding is not None and config.get("vocab_size") not in (None, embedding.shape[0]):
        logger.warning(
            "%s: vocab size %s from the metadata differs from the %d embedding rows; using the latter",
            file.path, config["vocab_size"], embedding.shape[0],
        )  # fmt: skip
        config["vocab_size"] = embedding.shape[0]


def _add_rope_scaling(file: GgufFile, architecture: str, config: dict[str, Any]) -> None:
    """Linear and YaRN rope scaling, which transformers' GGUF mapping leaves out."""
    scaling = file.metadata.get(f"{architecture}.rope.scaling.type")
    if scaling in (None, "none"):
        return
    factor = file.metadata.get(f"{architecture}.rope.scaling.factor")
    parameters = {"rope_type": scaling, "rope_theta": float(config.get("rope_theta", 10000.0)), "factor": factor}
    if scaling == "yarn":
        parameters["original_max_position_embeddings"] = file.metadata.get(
            f"{architecture}.rope.scaling.original_context_length"
        )
    if scaling not in ("linear", "yarn") or None in parameters.values():
        raise ModelLoadError(
            f"{file.path}: rope scaling {scaling!r} with keys {parameters} is not supported (only linear and yarn). "
            "Load the model from its Hugging Face folder instead."
        )
    config.pop("rope_theta", None)
    config["rope_parameters"] = parameters


def _config_from_file(file: GgufFile) -> transformers.PretrainedConfig:
    config = _config_dict(file)
    model_type = config["model_type"]
    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
        built = config_class.from_dict(config)
    except (KeyError, TypeError, ValueError) as exc:  # a value of the wrong kind under a known key
        raise ModelLoadError(
            f"{file.path}: the GGUF metadata does not describe a valid {model_type} model "
            f"({type(exc).__name__}: {exc}). The file is corrupt: re-download it or re-convert it."
        ) from exc
    if not built.architectures:
        built.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    built.dtype = torch.float32
    return built


def gguf_config(path: str | Path) -> transformers.PretrainedConfig:
    """The transformers config of the GGUF model at `path`, built from its metadata (float32)."""
    return _config_from_file(open_gguf(path))


# --------------------------------------------------------------------------------------------
# Tensors: names and layouts through transformers' processors, one tensor at a time


class _Names:
    """Just enough of a module for transformers' name mapping: the parameter names and the children.

    transformers walks the real module tree (every submodule's state_dict, which takes seconds on
    a 30-layer model); the mapping only ever matches names under the top two levels.
    """

    def __init__(self, config, names: list[str], depth: int = 2):
        self.config, self._names, self._depth = config, names, depth

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list[tuple[str, _Names]]:
        if not self._depth:
            return []
        groups: dict[str, list[str]] = {}
        for name in self._names:
            head, dot, rest = name.partition(".")
            if dot:
                groups.setdefault(head, []).append(rest)
        return [(head, _Names(self.config, names, self._depth - 1)) for head, names in groups.items()]


def _dequantize(file: GgufFile, tensor: GgufTensor) -> np.ndarray:
    try:
        values = dequantize_gguf_data(file.data(tensor), tensor.qtype)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"{file.path}: tensor {tensor.name!r} has type {type_name(tensor.qtype)}, which cannot be dequantized "
            f"here ({exc}). Re-convert the model to a common type (Q8_0, Q4_K_M, F16)."
        ) from exc
    return values.reshape(tensor.shape).numpy()


def _contradiction(file: GgufFile, gguf_name: str, got: tuple, want: tuple) -> ModelLoadError:
    return ModelLoadError(
        f"{file.path}: tensor {gguf_name!r} has shape {got}, but the model its metadata describes "
        f"({file.architecture}: sizes, head counts, vocabulary) needs {want}. The metadata contradicts the "
        "tensors: the file is corrupt or was written by a converter qlorafit does not know; re-convert it."
    )


# Tensors llama.cpp writes that have no transformers parameter and may be left out.
_IGNORABLE = {
    "rope_freqs.weight": "Llama 3 rope frequency factors, which transformers' GGUF mapping does not carry: the model "
    "runs with unscaled rope, so its outputs differ somewhat from llama.cpp's",
}


@dataclass
class _Plan:
    """How each tensor of a file becomes a model parameter."""

    processor: TensorProcessor
    mapping: dict[str, str]  # GGUF name (with or without .weight) -> HF name
    expected: dict[str, tuple[int, ...]]  # HF name -> shape

    def target(self, gguf_name: str) -> str | None:
        return self.mapping.get(gguf_name) or self.mapping.get(gguf_name.rpartition(".")[0])

    def handles_itself(self, gguf_name: str) -> bool:
        """True for tensors the processor splits or stacks under names of its own (gpt-oss experts)."""
        patterns = [getattr(self.processor, a, None) for a in ("GGUF_MOE_WEIGHTS_PATTERN", "GGUF_MOE_COMBINED_PATTERN")]
        return any(p is not None and p.fullmatch(gguf_name) for p in patterns)


def _plan(file: GgufFile, model: nn.Module, architecture: str) -> _Plan:
    """Map every tensor of the file to the model, refusing tensors the model has no place for."""
    processor = _PROCESSORS.get(architecture, TensorProcessor)(config=_config_dict(file))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    names = _Names(model.config, list(expected))
    layers = model.config.num_hidden_layers
    plan = _Plan(processor, get_gguf_hf_weights_map(names, processor, model_type=architecture, num_layers=layers), expected)
    for tensor in file.tensors:
        if tensor.name in _IGNORABLE:
            logger.warning("%s: ignoring tensor %s (%s)", file.path, tensor.name, _IGNORABLE[tensor.name])
        elif plan.target(tensor.name) is None and not plan.handles_itself(tensor.name):
            raise ModelLoadError(
                f"{file.path}: tensor {tensor.name!r} has no counterpart in transformers' {model.config.model_type} "
                "model; the file is a variant of its architecture that transformers does not build (or its "
                "general.architecture is wrong). Load the model from its Hugging Face folder instead."
            )
    return plan


def _convert(file: GgufFile, plan: _Plan) -> Iterator[tuple[str, torch.Tensor]]:
    # a parameter built from several tensors (stacked MoE gate and up) is complete once all were read
    parts = Counter(t for tensor in file.tensors if (t := plan.target(tensor.name)) is not None)
    built: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
    for tensor in file.tensors:
        if tensor.name in _IGNORABLE:
            continue
        weights = _dequantize(file, tensor)
        result = plan.processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=plan.mapping, parsed_parameters=built
        )
        if result.name is not None:
            name = plan.mapping[result.name]
            yield name, _checked(file, tensor.name, torch.from_numpy(np.ascontiguousarray(result.weights)), plan)
        elif (t := plan.target(tensor.name)) is not None:
            parts[t] -= 1
        for name in [n for n in built["tensors"] if parts.get(n, 0) <= 0]:
            yield name, _checked(file, tensor.name, built["tensors"].pop(name), plan, name)
    if built["tensors"]:
        raise _corrupt_error(file.path, f"tensors {sorted(built['tensors'])} are missing some of their parts")


def _checked(file: GgufFile, gguf_name: str, tensor: torch.Tensor, plan: _Plan, name: str | None = None) -> torch.Tensor:
    want = plan.expected.get(name or plan.target(gguf_name) or "")
    if want is not None and tuple(tensor.shape) != want:
        raise _contradiction(file, gguf_name, tuple(tensor.shape), want)
    logger.debug("%s: %s -> %s", file.path, gguf_name, tuple(tensor.shape))
    return tensor


def iter_gguf_tensors(path: str | Path, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, float32 tensor in HF layout) for the GGUF model at `path`, one at a time.

    `model` is the (empty, meta-device) model built from `gguf_config(path)`: its parameter names
    and shapes decide the mapping and are checked against every tensor.
    """
    # Not a generator itself: a missing, corrupt or unsupported file raises here, at the call,
    # before any tensor is read.
    file = open_gguf(path)
    architecture, _ = _architectures(file)
    plan = _plan(file, model, architecture)
    logger.info("%s: reading %d %s tensors", file.path, len(file.tensors), architecture)
    return _convert(file, plan)


# --------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_from_metadata(path: Path) -> transformers.PreTrainedTokenizerBase:
    """Build the tokenizer with transformers' GGUF converter, reading only the tokenizer arrays.

    `AutoTokenizer.from_pretrained(gguf_file=...)` parses the whole metadata a second time to
    build a config first (several seconds); its converter is used directly when available.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:  # another transformers layout: the public route (local_files_only: no hub)
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def gguf_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF metadata at `path`, with its chat template and a pad token; offline."""
    # the whole file is checked first: a truncated file fails here rather than after a tokenizer
    # was built from its intact metadata
    file = open_gguf(path)
    try:
        tokenizer = _tokenizer_from_metadata(file.path)
    except Exception as exc:
        raise ModelLoadError(
            f"{file.path}: cannot build a tokenizer from the GGUF metadata ({type(exc).__name__}: {exc}). "
            "Load the tokenizer from the model's Hugging Face folder instead."
        ) from exc
    if tokenizer.chat_template is None:  # transformers reads it too; this covers versions that do not
        template = file.metadata.get("tokenizer.chat_template")
        if template is not None:
            tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
