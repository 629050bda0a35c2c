"""Checkpoint layouts that differ from the model's: transformers' renamings and expert fusion, streamed.

Since transformers 5, MoE models keep each layer's experts as one fused 3-D parameter
(`mlp.experts.gate_up_proj`: experts x 2*intermediate x hidden) while checkpoints on disk store one
2-D tensor per expert and projection (`mlp.experts.3.gate_proj.weight`). transformers describes the
difference per model type (`transformers.conversion_mapping`); `from_pretrained` applies it with
the whole checkpoint at hand. Here the same description is applied while tensors stream in: keys
are renamed as they arrive, and per-expert tensors wait until their layer's set is complete, are
stacked, and leave as the fused parameter, so at most one layer's experts are held in full precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ModelLoadError

try:  # internal modules of transformers (5.x)
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
except ImportError:  # an older transformers: checkpoints and models share one layout
    get_checkpoint_conversion_mapping = None

# The operation chains whose effect is known here: stack the experts (dim 0), then join the
# projections along the output rows (dim 1).
_STACK, _STACK_AND_JOIN = ("MergeModulelist",), ("MergeModulelist", "Concatenate")


def _operations(converter) -> tuple[str, ...]:
    return tuple(type(op).__name__ for op in converter.operations)


class CheckpointLayout:
    """Turns checkpoint keys and tensors into the model's, one tensor at a time."""

    def __init__(self, model: nn.Module, source: str):
        self.source = source
        mapping = get_checkpoint_conversion_mapping(model.config.model_type) if get_checkpoint_conversion_mapping else None
        mapping = mapping or []
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.pending: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def convert(self, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The (model key, tensor) pairs that `key` completes: itself renamed, nothing yet, or a fused tensor."""
        if not self.renamings and not self.converters:
            yield key, tensor
            return
        name, pattern = rename_source_key(key, self.renamings, self.converters)
        if pattern is None:
            yield name, tensor
            return
        converter = self.by_pattern[pattern]
        if _operations(converter) not in (_STACK, _STACK_AND_JOIN):
            raise ModelLoadError(
                f"{self.source}: tensor {key} needs transformers' conversion {_operations(converter)}, which qlorafit "
                "cannot apply while streaming. Save the model again with transformers' save_pretrained and load that."
            )
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        parts = self.pending.setdefault(name, {})
        parts[(converter.source_patterns.index(pattern), int(expert[1]))] = tensor
        n_experts = self._experts(name, key)
        if len(parts) == len(converter.source_patterns) * n_experts:
            del self.pending[name]
            stacks = [torch.stack([parts.pop((i, e)) for e in range(n_experts)]) for i in range(len(converter.source_patterns))]
            yield name, torch.cat(stacks, dim=1) if len(stacks) > 1 else stacks[0]

    def _experts(self, name: str, key: str) -> int:
        shape = self.shapes.get(name) or self.shapes.get(f"{self.prefix}.{name}")
        if shape is None:
            raise ModelLoadError(f"{self.source}: tensor {key} belongs to {name}, which the model built from its config lacks")
        return shape[0]

    def finish(self) -> None:
        """Raise if some fused parameter never received all of its parts."""
        if self.pending:
            name, parts = next(iter(self.pending.items()))
            raise ModelLoadError(
                f"{self.source}: the checkpoint has only {len(parts)} of the per-expert tensors that make up {name} "
                f"(and {len(self.pending) - 1} more incomplete); it is incomplete, download it again"
            )
