"""save_merged: write the model with its adapter folded in as a Hugging Face folder.

The merge is computed layer by layer into the tensors being written, so the model in
memory keeps its adapter and its 4-bit weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..lora.layer import LoraLinear
from ..lora.merge import float_layer, is_quantized
from ..models.numerics import parse_dtype
from ..progress import task
from .folder import write_hf_folder


def merged_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of the merged model in checkpoint layout, one layer at a time, tied weights once."""
    seen: set[int] = set()
    folded: list[str] = []  # prefixes of layers already written whole
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if any(prefix.startswith(f) for f in folded):
            continue
        if isinstance(module, LoraLinear) or is_quantized(module):
            folded.append(prefix)
            for attr, t in float_layer(module, dtype).named_parameters():
                yield prefix + attr, t.detach()
            continue
        if parametrize.is_parametrized(module):  # 4-bit fused experts: written as the float tensors they stand for
            folded.append(f"{prefix}parametrizations.")
            for attr in module.parametrizations:
                yield prefix + attr, getattr(module, attr).detach().to(dtype)
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # a tied weight (e.g. lm_head = embed_tokens) is stored once
            seen.add(id(p))
            yield prefix + attr, p.detach().to(dtype) if p.is_floating_point() else p.detach()
        for attr, b in module.named_buffers(recurse=False):
            if attr not in module._non_persistent_buffers_set:
                yield prefix + attr, b.detach()


def save_merged(
    model: nn.Module, tokenizer, directory: str | os.PathLike, dtype: str | torch.dtype = "float32", overwrite: bool = False
) -> Path:
    """Write `model` with LoRA merged and 4-bit weights dequantized as a Hugging Face folder."""
    dtype = parse_dtype(dtype)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    total = len(dict(model.named_parameters())) + sum(
        len(m._buffers) - len(m._non_persistent_buffers_set) for m in model.modules())

    def counted():
        with task(f"merging into {Path(directory).name}", total, "tensor") as bar:
            for item in merged_tensors(model, dtype):
                yield item
                bar.update()

    return write_hf_folder(directory, counted(), config, tokenizer, overwrite)
