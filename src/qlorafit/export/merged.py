"""save_merged: write the model with its adapter folded in as a Hugging Face folder.

The merge is computed layer by layer into the tensors being written, so the model in
memory keeps its adapter and its 4-bit weights. The folder is written under a temporary
name and renamed into place, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import QlorafitError
from ..lora.layer import LoraLinear
from ..lora.merge import _is_quantized, float_layer
from ..models.numerics import parse_dtype

SHARD_BYTES = 2 * 1024**3


def merged_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of the merged model in checkpoint layout, one layer at a time, tied weights once."""
    seen: set[int] = set()
    folded: list[str] = []  # prefixes of layers already written whole
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if any(prefix.startswith(f) for f in folded):
            continue
        if isinstance(module, LoraLinear) or _is_quantized(module):
            folded.append(prefix)
            for attr, t in float_layer(module, dtype).named_parameters():
                yield prefix + attr, t.detach()
            continue
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # a tied weight (e.g. lm_head = embed_tokens) is stored once
            seen.add(id(p))
            yield prefix + attr, p.detach().to(dtype) if p.is_floating_point() else p.detach()
        for attr, b in module.named_buffers(recurse=False):
            if attr not in module._non_persistent_buffers_set:
                yield prefix + attr, b.detach()


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_merged(
    model: nn.Module, tokenizer, directory: str | os.PathLike, dtype: str | torch.dtype = "float32", overwrite: bool = False
) -> Path:
    """Write `model` with LoRA merged and 4-bit weights dequantized as a Hugging Face folder."""
    directory = Path(directory)
    dtype = parse_dtype(dtype)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise QlorafitError(f"{directory}: folder exists and is not empty; choose another or pass overwrite=True")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_shards(merged_tensors(model, dtype), tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
