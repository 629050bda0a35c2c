"""Folding adapters into the base weights: a plain transformers model with float weights.

Every LoraLinear becomes a float layer holding `W + s * B @ A` (W dequantized first for a 4-bit
base), and every remaining 4-bit layer becomes its dequantized float layer, so the result
is an ordinary model that `save_pretrained`-style code can write. Layers that were GPT-2
`Conv1D` go back to `Conv1D` with its (in, out) layout, which is what their checkpoints hold.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import Conv1D, LoraLinear


def is_quantized(module: nn.Module) -> bool:
    """True for a layer that stores its weight quantized (it has `dequantize()` and a quant state)."""
    return callable(getattr(module, "dequantize", None)) and hasattr(module, "quant_state")


def _conv1d_layout(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLinear) else module
    return isinstance(base, Conv1D) or bool(getattr(base, "conv1d_layout", False))


def float_layer(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain float layer computing what a LoraLinear or 4-bit layer computes (no dropout)."""
    if isinstance(module, LoraLinear):
        weight = module.merged_weight(dtype)
        bias = getattr(module.base_layer, "bias", None)
    else:
        weight = module.dequantize(torch.float32).to(dtype)
        bias = module.bias
    out_features, in_features = weight.shape
    if _conv1d_layout(module):
        layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        layer.bias = nn.Parameter(
            bias.detach().to(dtype) if bias is not None else torch.zeros(out_features, dtype=dtype), requires_grad=False
        )
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def merge_lora(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace LoRA and 4-bit layers by merged float layers in place; returns the plain model."""
    replace = [name for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name in replace:
        model.set_submodule(name, float_layer(model.get_submodule(name), dtype))
    quantized = [name for name, m in model.named_modules() if is_quantized(m)]
    for name in quantized:
        model.set_submodule(name, float_layer(model.get_submodule(name), dtype))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
