"""Linear4bit: a frozen linear layer whose weight lives as packed 4-bit codes.

Forward and backward run through `_Matmul4bit`, which dequantizes the weight into the compute
dtype for the one matmul that needs it and lets it go: autograd saves nothing from this
layer but a reference to the module (whose packed codes exist anyway), so no full-precision
copy of a frozen weight outlives the op that used it. The price is a second dequantization
in backward, which is cheap next to the matmul it feeds.

Its state dict uses bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`, ...),
so a checkpoint saved by bitsandbytes loads here as it is, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import dequantize_4bit, quantize_4bit
from .state import QuantState, is_quant_state_key


class _Matmul4bit(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly in both passes; only x gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype, reuse_buffer=True), _bias(layer, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = ctx.layer.dequantize(grad_out.dtype, reuse_buffer=True)  # (out, in)
        return grad_out @ weight, None


def _bias(layer: Linear4bit, dtype: torch.dtype) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(dtype)


class Linear4bit(nn.Module):
    """A frozen `nn.Linear` stored as 4-bit NF4/FP4 codes plus a QuantState."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        quant_state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        # True when the layer was a GPT-2 style Conv1D, whose checkpoints store (in, out).
        self.conv1d_layout = False
        self.register_buffer("weight", packed)
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Linear4bit:
        """Quantize an (out, in) weight into a new layer."""
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
        bias = None if bias is None else bias.detach().to(compute_dtype)
        return cls(weight.shape[1], weight.shape[0], packed, state, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> Linear4bit:
        """Quantize an existing `nn.Linear` into a new layer."""
        return cls.from_weight(linear.weight.detach(), linear.bias, **kwargs)

    def dequantize(self, dtype: torch.dtype | None = None, reuse_buffer: bool = False) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: the compute dtype).

        With `reuse_buffer` a float32 result lives in the open `dequant_workspace`'s buffer,
        which the next such call overwrites: for a weight consumed by one matmul and then dropped.
        """
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.compute_dtype, reuse_buffer=reuse_buffer)

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by `weight` (out, in), quantized with the same settings."""
        s = self.quant_state
        self.weight, self.quant_state = quantize_4bit(weight, s.quant_type, s.blocksize, s.nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Matmul4bit.apply(x.to(self.compute_dtype), self)
        return out.to(x.dtype)

    def logical_numel(self) -> int:
        """Number of weights the layer represents (not the packed bytes)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        # Device moves apply to the state too; dtype casts must never touch codes or scales.
        super()._apply(fn, recurse)
        self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool, missing: list, unexpected: list, errors: list
    ) -> None:
        state_items = {
            k[len(prefix) + len("weight.") :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix + "weight.") and is_quant_state_key(k)
        }
        if state_items:
            self.quant_state = QuantState.from_dict(state_items, device=self.weight.device)
        own = {k: v for k, v in state_dict.items() if not (k.startswith(prefix + "weight.") and is_quant_state_key(k))}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing, unexpected, errors)
