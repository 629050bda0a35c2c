"""4-bit storage for frozen parameters that are not linear layers: fused 3-D MoE expert weights.

transformers keeps the experts of recent MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral, ...) as one
`(experts, out, in)` parameter per projection and indexes it inside its own forward. Such a
parameter is quantized block-wise over its flattened values (the same NF4/FP4 blocks, double
quantization and bytes as a `Linear4bit` weight) and put back as a `torch.nn.utils.parametrize`
parametrization: the module stores the packed codes and reads a dequantized tensor whenever its
code touches the attribute. Within one forward call of the owning module the tensor is decoded
once (parametrize's cache), not once per expert the code indexes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils import parametrize

from .blockwise import dequantize_4bit, quantize_4bit
from .state import QuantState


class Dequantize4bit(nn.Module):
    """Parametrization: packed 4-bit codes -> the float tensor they stand for, in the compute dtype."""

    def __init__(self, quant_state: QuantState, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.quant_state = quant_state
        self.compute_dtype = compute_dtype

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        if self.quant_state.absmax.device != packed.device:  # the codes moved: the scales follow
            self.quant_state.to(packed.device)
        return dequantize_4bit(packed, self.quant_state, self.compute_dtype)

    def logical_numel(self) -> int:
        return self.quant_state.shape.numel()


def _decode_once_per_call(forward, *args, **kwargs):
    with parametrize.cached():
        return forward(*args, **kwargs)


def quantize_parameter(
    module: nn.Module,
    name: str,
    value: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """Store `value` as module.`name` (frozen) in 4 bits, read back dequantized in `compute_dtype`."""
    packed, state = quantize_4bit(value, quant_type, blocksize, double_quant)
    # the codes are a buffer, as in Linear4bit: never a parameter an optimizer or counter could see
    module._parameters.pop(name, None)
    module.register_buffer(name, packed)
    parametrize.register_parametrization(module, name, Dequantize4bit(state, compute_dtype), unsafe=True)
    if not isinstance(module.forward, functools.partial):
        module.forward = functools.partial(_decode_once_per_call, module.forward)


def quantized_parameters(module: nn.Module) -> dict[str, Dequantize4bit]:
    """The 4-bit parametrizations of a model, by full parameter name."""
    found = {}
    for module_name, owner in module.named_modules():
        for name, chain in getattr(owner, "parametrizations", {}).items():
            for p in chain:
                if isinstance(p, Dequantize4bit):
                    found[f"{module_name}.{name}" if module_name else name] = p
    return found
