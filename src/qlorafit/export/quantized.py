"""save_quantized: write the 4-bit base model as a bitsandbytes 4-bit Hugging Face folder.

The folder is what transformers writes for a model loaded with `load_in_4bit`: packed codes
and quant-state tensors under bitsandbytes' keys, and a `quantization_config` in config.json,
so transformers + bitsandbytes (and `load_model` here) load it without re-quantizing. LoRA
layers are left out: save them with `save_adapter`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import QlorafitError
from ..quant.linear4bit import Linear4bit
from .folder import write_hf_folder


def _base_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict without LoRA weights, wrapped layers under their own names, tied once."""
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if isinstance(t, nn.Parameter):
            if id(t) in seen:
                continue  # a tied weight (e.g. lm_head = embed_tokens) is stored once
            seen.add(id(t))
        yield key.replace(".base_layer.", "."), t.detach()


def quantization_config(model: nn.Module) -> dict:
    """transformers' BitsAndBytesConfig dict describing the model's 4-bit layers."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise QlorafitError("the model has no 4-bit layers: load it with quant='nf4' or 'fp4' to save it quantized")
    kinds = {(m.quant_state.quant_type, m.quant_state.blocksize, m.quant_state.nested) for m in layers}
    if len(kinds) > 1:
        raise QlorafitError(f"the 4-bit layers mix settings {sorted(kinds)}; bitsandbytes folders hold one setting")
    quant_type, _, nested = kinds.pop()
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": str(layers[0].compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def save_quantized(model: nn.Module, tokenizer, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the 4-bit base model (no adapter) as a bitsandbytes 4-bit Hugging Face folder."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    return write_hf_folder(directory, _base_tensors(model), config, tokenizer, overwrite)
