"""FSDP2 for a 4-bit base: each rank keeps 1/N of every decoder layer's packed 4-bit codes.

`LayerSharder` is `load_model`'s `on_layer` hook: the moment a decoder layer's last tensor has
been read and quantized, it hashes the layer (so that the ranks can check they loaded the same
weights) and, under FSDP, turns the packed codes of its `Linear4bit` modules into frozen uint8
parameters and hands the layer to `torch.distributed.fsdp.fully_shard` (FSDP2). FSDP keeps
1/N of the codes on each rank and frees the rest, so the whole 4-bit base never sits on one
device: the peak while loading is the shards plus one layer. In training it all-gathers a
layer's codes only while that layer runs (the forward, checkpointing's recomputation and the
backward). The gathered bytes are the same codes every rank quantized, so the arithmetic, and
the adapter, are the same as on one process.

What stays whole on every rank, by choice: the LoRA parameters, their gradients and optimizer
state (small; the gradients are reduced in micro-batch order by `distributed.py`, which keeps
runs exact and checkpoints in the one-process format), the block scales and code books (1/32
of the codes' bytes with double quantization, 1/8 without), norms, biases, embeddings and the
output head (used outside the decoder layers by the chunked loss; tied or not, they stay one
tensor), and 4-bit MoE expert tensors stored as parametrizations.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

import torch
from torch import nn

from ..errors import QlorafitError
from ..models.load import layer_stack
from ..quant.linear4bit import Linear4bit
from .distributed import digest_of

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


def _codes_as_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """Re-register each Linear4bit's packed codes (a buffer) as a frozen parameter FSDP can shard."""
    codes = []
    for module in layer.modules():
        if isinstance(module, Linear4bit) and "weight" in module._buffers:
            packed = module._buffers.pop("weight")
            module.weight = nn.Parameter(packed, requires_grad=False)
            codes.append(module.weight)
    return codes


class LayerSharder:
    """`load_model(on_layer=...)`: hash each decoder layer as it is loaded and, when `shard`,
    shard its 4-bit codes across the `world_size` ranks of the default process group."""

    def __init__(self, device: torch.device, world_size: int, shard: bool) -> None:
        self.digests: dict[str, str] = {}
        self.mesh = None
        if shard:
            reason = unsupported()
            if reason:
                raise QlorafitError(f"train.distributed: fsdp: {reason}; use ddp")
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (world_size,))

    def __call__(self, name: str, layer: nn.Module) -> None:
        self.digests[name] = digest_of([*layer.named_parameters(), *layer.named_buffers()])
        if self.mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        codes = {id(p) for p in _codes_as_parameters(layer)}
        if not codes:
            raise QlorafitError(f"train.distributed: fsdp shards 4-bit codes and decoder layer {name} has none; "
                                "use quant.type nf4 or fp4, or ddp")
        keep = {p for p in layer.parameters() if id(p) not in codes}
        fully_shard(layer, mesh=self.mesh, reshard_after_forward=True, ignored_params=keep)

    def model_digest(self, model: nn.Module) -> str:
        """A hash of the whole model: the layers' hashes taken at load time, and every tensor that
        is not a shard (embeddings, norms, head, and the adapters added since)."""
        whole = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if not hasattr(t, "to_local")]
        layers = "".join(f"{n}:{d};" for n, d in sorted(self.digests.items()))
        return hashlib.blake2b(f"{layers}{digest_of(whole)}".encode(), digest_size=16).hexdigest()


def shard_base(model: nn.Module, device: torch.device, world_size: int) -> None:
    """Shard the packed codes of every decoder layer of a loaded model across the ranks (FSDP2)."""
    stack = layer_stack(model)
    if stack is None:
        raise QlorafitError("train.distributed: fsdp shards a stack of decoder layers, and this model has none; use ddp")
    sharder = LayerSharder(device, world_size, shard=True)
    for i, layer in enumerate(stack[1]):
        sharder(f"{stack[0]}.{i}", layer)
    logger.info("fsdp: %d decoder layers sharded over %d ranks", len(stack[1]), world_size)


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
