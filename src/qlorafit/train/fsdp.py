"""FSDP2 for a 4-bit base: each rank keeps 1/N of every decoder layer's packed 4-bit codes.

`shard_base` turns the packed codes of each decoder layer's `Linear4bit` modules into frozen
uint8 parameters and hands each layer to `torch.distributed.fsdp.fully_shard` (FSDP2), which
splits them across the ranks and all-gathers a layer's codes only while that layer runs (in
the forward, and again in the backward and in checkpointing's recomputation). The gathered
bytes are the same codes every rank quantized, so the arithmetic, and the adapter, are the
same as on one process.

What stays whole on every rank, by choice: the LoRA parameters, their gradients and optimizer
state (small; the gradients are reduced in micro-batch order by `distributed.py`, which keeps
runs exact and checkpoints in the one-process format), the block scales and code books (1/32
of the codes' bytes with double quantization, 1/8 without), norms, biases, embeddings and the output
head (used outside the decoder layers by the chunked loss; tied or not, they stay one tensor),
and 4-bit MoE expert tensors stored as parametrizations.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from ..errors import QlorafitError
from ..quant.linear4bit import Linear4bit

logger = logging.getLogger(__name__)


def unsupported() -> str | None:
    """Why FSDP2 cannot run with this torch, or None: it needs `fully_shard` with `ignored_params`
    (torch 2.7 or later; checked with 2.13)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)"
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        return f"torch {torch.__version__}'s fully_shard cannot leave parameters unsharded; FSDP needs torch >= 2.7"
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its ModuleList holding the most 4-bit layers."""
    best, count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            n = sum(isinstance(m, Linear4bit) for m in module.modules())
            if n > count:
                best, count = module, n
    if best is None:
        raise QlorafitError("train.distributed: fsdp shards a 4-bit base's decoder layers, and this model has no "
                            "4-bit linear layers in a layer stack; use quant.type nf4 or fp4, or ddp")
    return best


def _codes_as_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """Re-register each Linear4bit's packed codes (a buffer) as a frozen parameter FSDP can shard."""
    codes = []
    for module in layer.modules():
        if isinstance(module, Linear4bit) and "weight" in module._buffers:
            packed = module._buffers.pop("weight")
            module.weight = nn.Parameter(packed, requires_grad=False)
            codes.append(module.weight)
    return codes


def shard_base(model: nn.Module, device: torch.device, world_size: int) -> None:
    """Shard the packed codes of every decoder layer across the process group's ranks (FSDP2)."""
    reason = unsupported()
    if reason:
        raise QlorafitError(f"train.distributed: fsdp: {reason}; use ddp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    layers = decoder_layers(model)
    for layer in layers:
        codes = {id(p) for p in _codes_as_parameters(layer)}
        keep = {p for p in layer.parameters() if id(p) not in codes}
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=keep)
    logger.info("fsdp: %d decoder layers sharded over %d ranks", len(layers), world_size)


def code_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of packed 4-bit codes this rank holds, bytes of all codes): 1/N of them when sharded."""
    local = total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            full = w.numel() * w.element_size()
            total += full
            local += w.to_local().numel() * w.element_size() if hasattr(w, "to_local") else full
    return local, total
