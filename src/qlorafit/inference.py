"""Inference with float weights: every 4-bit layer dequantized once, not on every forward call.

A `Linear4bit` dequantizes its whole weight in each forward call, which training needs (no
float copy of a frozen weight may outlive its matmul) but generation pays for on every new
token. `dequantized_for_inference` swaps each `Linear4bit` for a `DequantizedLinear` holding
the same weight decoded once into the compute dtype, and puts the very same 4-bit modules
back when it exits, on an exception too. A `LoraLinear` over a 4-bit base gets the swap inside
it (its `base_layer`), since it handles a float `nn.Linear` base as it is.

The trade-off is memory: the float weights (4 bytes a weight in float32, 2 in bfloat16) live
beside the 4-bit codes while the context is open. When they do not fit in the memory
available (leaving a share for activations and the KV cache), nothing is swapped, and the
model runs as it is, only slower, its forward calls decoding into one shared `dequant_workspace`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .quant.blockwise import dequant_workspace
from .quant.linear4bit import Linear4bit
from .sysmem import free_memory

log = logging.getLogger(__name__)

GiB = 1024**3
# Share of the available memory the float weights may take; the rest stays for activations, the
# KV cache and the allocator.
WEIGHT_SHARE = 0.75


class DequantizedLinear(nn.Linear):
    """A frozen float `nn.Linear` computing exactly what the `Linear4bit` it came from computes.

    Like `Linear4bit.forward`, it casts the input to the compute dtype and the output back to
    the input's dtype, so a caller sees no difference but the speed.
    """

    @classmethod
    def from_4bit(cls, layer: Linear4bit) -> DequantizedLinear:
        """The layer's weight dequantized once into its compute dtype; the bias shared when it can be."""
        dtype = layer.compute_dtype
        linear = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
        with torch.no_grad():
            linear.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)  # (out, in), a fresh tensor
            if layer.bias is not None:
                linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        linear.train(layer.training)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def _float_bytes(layers: list[Linear4bit]) -> dict[torch.device, int]:
    """Bytes the dequantized weights would take, per device."""
    need: dict[torch.device, int] = {}
    for layer in layers:
        size = layer.logical_numel() * layer.compute_dtype.itemsize
        need[layer.weight.device] = need.get(layer.weight.device, 0) + size
    return need


def _fits(layers: list[Linear4bit], budget_bytes: int | None) -> bool:
    for device, need in _float_bytes(layers).items():
        budget = budget_bytes if budget_bytes is not None else int(WEIGHT_SHARE * free_memory(device))
        if need > budget:
            log.info("keeping 4-bit weights for inference: their float copies need %.2f GiB on %s, "
                     "the budget there is %.2f GiB (each forward call dequantizes them instead)",
                     need / GiB, device, budget / GiB)
            return False
    return True


@contextmanager
def dequantized_for_inference(model: nn.Module, budget_bytes: int | None = None) -> Iterator[nn.Module]:
    """Within the block, every `Linear4bit` of `model` is a float `DequantizedLinear` (if they fit).

    `budget_bytes` caps the float weights' size per device; by default they may take
    `WEIGHT_SHARE` of the memory available there. On exit the original 4-bit modules (the same
    objects) are put back. For inference only: the float weights do not train. Nested use is a
    no-op, as the inner call finds no 4-bit layer left.
    """
    # (parent, child name, 4-bit layer) for every place a Linear4bit sits, shared layers included
    sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, Linear4bit)]
    unique = list({id(layer): layer for _, _, layer in sites}.values())
    if not unique:
        yield model
        return
    if not _fits(unique, budget_bytes):
        with dequant_workspace():  # each forward decodes into one reused buffer instead
            yield model
        return
    floats: dict[int, DequantizedLinear] = {}
    try:
        for parent, name, layer in sites:
            if id(layer) not in floats:
                floats[id(layer)] = DequantizedLinear.from_4bit(layer)
            setattr(parent, name, floats[id(layer)])
        log.info("dequantized %d 4-bit layers for inference", len(unique))
        yield model
    finally:
        for parent, name, layer in sites:
            setattr(parent, name, layer)
