"""LoraLinear: a frozen linear layer plus a trainable low-rank update.

    y = base(x) + s * B(A(dropout(x))),  A: (r, in) Kaiming-uniform, B: (out, r) zeros,
    s = alpha / r  (rsLoRA: alpha / sqrt(r))

The layer wraps the existing module and never learns its storage format: a base that is not
a plain float linear layer only has to offer `dequantize(dtype)` returning its (out, in)
weight. GPT-2's `Conv1D` keeps its weight as (in, out) and is handled by `_base_weight`.
LoRA weights are always float32, whatever the base computes in.

Training runs base and adapter as one autograd function (`_LoraMatmul`): the frozen weight is
materialised (or dequantized into a reused buffer) only for the matmul that needs it, the
update is added into the base output in place, and backward keeps only the input, the rank-r
activation and the dropout mask as bytes. Layers that read the same input tensor (q/k/v,
gate/up) share one dropout mask, drawn once per input; under activation checkpointing the
recomputation restores the random state and draws the same masks again.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ..errors import AdapterError

try:  # GPT-2 style layers; transformers is a dependency, but keep the layer importable alone.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a wrappable layer."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.nf
    return base.in_features, base.out_features


def is_wrappable(module: nn.Module) -> bool:
    """True for the layer kinds LoRA can wrap: nn.Linear, Conv1D, anything with `dequantize()`."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    return callable(getattr(module, "dequantize", None)) and hasattr(module, "in_features")


def _base_weight(base: nn.Module, dtype: torch.dtype, reuse_buffer: bool = False) -> torch.Tensor:
    """The base layer's weight as (out, in) in `dtype`: a view of a float weight, or dequantized.

    With `reuse_buffer` a 4-bit weight is dequantized into a per-thread buffer that the next
    such call overwrites: for a weight one matmul consumes and drops.
    """
    if isinstance(base, Conv1D):
        return base.weight.detach().t().to(dtype)
    if isinstance(base, nn.Linear):
        return base.weight.detach().to(dtype)
    if reuse_buffer and hasattr(base, "quant_state"):
        return base.dequantize(dtype, reuse_buffer=True)
    return base.dequantize(dtype)


def _compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The dtype the base multiplies in, or None if the fused path does not apply to it."""
    if isinstance(base, (nn.Linear, Conv1D)):
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        return base.weight.dtype
    return getattr(base, "compute_dtype", None)


class MaskCache:
    """The dropout mask of the last input seen, so layers reading the same tensor share it.

    One per model (`add_lora` gives all of a model's LoRA layers the same cache; a layer made on
    its own has its own), so two models, threads or ranks in one process never share masks.
    """

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.key: tuple = ()
        self.mask: torch.Tensor | None = None

    def mask_for(self, x: torch.Tensor, p: float) -> torch.Tensor:
        key = (x._version, p, tuple(x.shape))
        if self.source is None or self.source() is not x or self.key != key:
            self.mask = keep_mask(x.shape, p, x.device)
            self.source, self.key = weakref.ref(x), key
        return self.mask


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True with probability 1 - p, from 16 random bits per element (p resolved to 2^-16).

    Random int64 words read as four int16 each: a quarter of the generator calls of
    `torch.rand(shape) >= p`, and no float tensor (2.6x faster on a 1024 x 2048 mask on this CPU).
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    return (words.view(torch.int16)[:n] >= round(p * 65536) - 32768).view(shape)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (float32) with the dropped positions zeroed; x itself when there is no mask."""
    x = x.float()
    return x if mask is None else torch.where(mask.reshape(x.shape), x, 0.0)


# Two tensors each LoRA layer holds between passes (attributes of the layer, not globals):
# - `recomputed_weight`: the base weight dequantized while activation checkpointing recomputes the
#   layer's forward, kept for its backward, which runs right after: one dequantization for both
#   instead of two; it leaves at that backward.
# - `kept_output`: selective checkpointing's base output x W^T (+ b) from the first forward, kept
#   for the checkpoint's recomputation of the same layer, which then skips both the dequantization
#   and the matmul (the backward dequantizes once for the input gradient). One (tokens, out) tensor
#   per wrapped layer until the layer's recomputation; `release_kept_outputs` drops what is left.


def keep_base_outputs(model: nn.Module, keep: bool = True) -> None:
    """Turn selective checkpointing's kept base outputs on (or off) for every LoRA layer of `model`."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.keep_base_output = keep


def release_kept_outputs(model: nn.Module) -> None:
    """Drop the base outputs of `model` that no recomputation used (called after each backward)."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.kept_output = None


def _recomputing() -> bool:
    """True inside a backward pass: a forward running now is a checkpoint's recomputation."""
    return torch._C._current_graph_task_id() != -1


def _base_output(ctx, x: torch.Tensor, x2: torch.Tensor, layer: LoraLinear, recomputing: bool) -> torch.Tensor:
    """x W^T + b in x's shape, W dequantized (and kept for the backward when recomputing)."""
    if ctx.needs_input_grad[0] and hasattr(layer.base_layer, "quant_state") and recomputing:
        weight = layer.recomputed_weight = _base_weight(layer.base_layer, x.dtype)
    else:
        weight = _base_weight(layer.base_layer, x.dtype, reuse_buffer=True)
    # the result is allocated in its final shape and filled through a 2-D view: a custom
    # Function must not return a view, or a caller's in-place op on it would be refused
    result = x2.new_empty(*x.shape[:-1], weight.shape[0])
    out = torch.mm(x2, weight.t(), out=result.view(-1, weight.shape[0]))
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        out += bias
    return result


class _LoraMatmul(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T in one op; saves x, the rank-r activation and the mask."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, layer, mask):
        x2 = x.reshape(-1, x.shape[-1])
        recomputing = _recomputing()
        kept = layer.kept_output if recomputing else None
        if recomputing:
            layer.kept_output = None
        if kept is not None and kept.shape[:-1] == x.shape[:-1]:
            result = kept  # selective checkpointing: the first forward's base output
            out = result.view(-1, result.shape[-1])
        else:
            result = _base_output(ctx, x, x2, layer, recomputing)
            out = result.view(-1, result.shape[-1])
            if layer.keep_base_output and not recomputing:
                layer.kept_output = result.clone()
        # dropout(x) A^T = ((x * mask) A^T) / (1 - p): the scale goes on the rank-r side
        a = _masked(x2, mask) @ weight_a.t()  # (tokens, r)
        if mask is not None:
            a.mul_(1.0 / (1.0 - layer.dropout_p))
        if out.dtype == torch.float32:
            out.addmm_(a, weight_b.t(), alpha=layer.scaling)
        else:
            out += (a @ weight_b.t() * layer.scaling).to(out.dtype)
        ctx.layer = layer
        ctx.save_for_backward(x, weight_a, weight_b, a, mask)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_a, weight_b, a, mask = ctx.saved_tensors
        layer = ctx.layer
        s, keep = layer.scaling, 1.0 / (1.0 - layer.dropout_p)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gf = g.float()
        grad_a_act = (gf @ weight_b).mul_(s)  # d loss / d a: (tokens, r)
        grad_b = (gf.t() @ a).mul_(s)
        del gf
        if mask is not None:
            grad_a_act.mul_(keep)  # now d loss / d (x * mask) A^T
        grad_a = grad_a_act.t() @ _masked(x.reshape(-1, x.shape[-1]), mask)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight, layer.recomputed_weight = layer.recomputed_weight, None
            if weight is None or weight.dtype != g.dtype:
                weight = _base_weight(layer.base_layer, g.dtype, reuse_buffer=True)
            grad_x = g @ weight
            del weight
            lora_x = _masked(grad_a_act @ weight_a, mask)
            grad_x += lora_x.to(grad_x.dtype)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_a, grad_b, None, None


class LoraLinear(nn.Module):
    """A linear layer (float, Conv1D or 4-bit) with a trainable rank-`r` update."""

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise AdapterError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        in_features, out_features = base_features(base)
        self.base_layer = base
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.merged = False
        self.keep_base_output = False  # selective checkpointing (keep_base_outputs)
        self.kept_output: torch.Tensor | None = None
        self.recomputed_weight: torch.Tensor | None = None
        self.masks = MaskCache()  # add_lora shares one cache among a model's layers
        self.reset_lora_parameters()

    @classmethod
    def from_base(cls, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> LoraLinear:
        """Wrap `base` with a fresh adapter (B = 0, so the output is unchanged)."""
        return cls(base, r, alpha, dropout, rslora)

    @property
    def in_features(self) -> int:
        return self.lora_A.in_features

    @property
    def out_features(self) -> int:
        return self.lora_B.out_features

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if torch.is_grad_enabled() and _compute_dtype(self.base_layer) == x.dtype:
            mask = self.masks.mask_for(x, self.dropout_p) if self.training and self.dropout_p > 0 else None
            return _LoraMatmul.apply(x, self.lora_A.weight, self.lora_B.weight, self, mask)
        out = self.base_layer(x)
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A as an (out, in) float32 tensor."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight plus the update, (out, in), computed in float32 and cast to `dtype`."""
        weight = _base_weight(self.base_layer, torch.float32)
        if not self.merged:
            weight = weight + self.delta_weight().to(weight.device)
        return weight.to(dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain `nn.Linear` computing what this layer computes (no dropout)."""
        bias = getattr(self.base_layer, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(self.merged_weight(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return linear

    def merge(self) -> None:
        """Fold the update into the base weight in place (a 4-bit base is re-quantized, lossy)."""
        if not self.merged:
            self._shift_base(self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        """Undo `merge()` (exact for float bases up to rounding; lossy again for 4-bit)."""
        if self.merged:
            self._shift_base(-self.delta_weight())
            self.merged = False

    def _shift_base(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        with torch.no_grad():
            if isinstance(base, Conv1D):
                base.weight += delta.t().to(base.weight.dtype)
            elif isinstance(base, nn.Linear):
                base.weight += delta.to(base.weight.dtype)
            elif hasattr(base, "requantize"):
                base.requantize(base.dequantize(torch.float32) + delta)
            else:
                raise AdapterError(f"cannot merge into a {type(base).__name__}: it has no requantize()")

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, merged={self.merged}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
