"""Choosing which layers get LoRA, wrapping them, and freezing everything else.

Targets follow PEFT's rules so an adapter config means the same thing in both libraries:
  - "all-linear": every linear layer except the output head;
  - a list of names: a module matches when its full name equals an entry or ends with
    "." + entry ("q_proj" matches "model.layers.0.self_attn.q_proj");
  - any other string: a regular expression that must match the full module name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import TargetError
from .layer import LoraLinear, MaskCache, is_wrappable

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """What an adapter is: its rank, scale, dropout and the layers it targets."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list[str] = ALL_LINEAR
    rslora: bool = False
    # Filled in by add_lora: the full names of the wrapped modules.
    wrapped: list[str] = field(default_factory=list)


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers (a LoraLinear counts as the layer it wraps, not its parts)."""
    names, inside = [], ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if isinstance(module, LoraLinear):
            inside = (name + ".",)
            names.append(name)
        elif is_wrappable(module):
            names.append(name)
    return names


def find_targets(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR) -> list[str]:
    """Full names of the layers `targets` selects; raises TargetError when there are none."""
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as exc:
            raise TargetError(f"LoRA targets {targets!r} is not a valid regular expression: {exc}") from exc
    heads = _output_head_names(model)
    candidates = _linear_layers(model)
    if targets == ALL_LINEAR:
        chosen = [n for n in candidates if n not in heads]
    else:
        chosen = [n for n in candidates if _matches(n, targets)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in candidates})
        raise TargetError(
            f"LoRA targets {targets!r} match no linear layer of this model; "
            f"its linear layers end in: {', '.join(suffixes) or '(none)'}. "
            "Use one of those names, a regex over full module names, or 'all-linear'."
        )
    return chosen


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: str | Sequence[str] = ALL_LINEAR,
    rslora: bool = False,
) -> nn.Module:
    """Wrap the target layers of `model` in LoraLinear (in place), freeze the rest, return it."""
    if getattr(model, "lora_config", None) is not None:
        raise TargetError("this model already has LoRA layers; load or merge the existing adapter instead")
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = MaskCache()  # one per model: layers reading the same input share its dropout mask
    for name in names:
        layer = LoraLinear.from_base(model.get_submodule(name), r, alpha, dropout, rslora)
        layer.masks = masks
        model.set_submodule(name, layer.train(model.training))
    targets_saved = targets if isinstance(targets, str) else list(targets)
    model.lora_config = LoraConfig(r, alpha, dropout, targets_saved, rslora, wrapped=names)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear of the model by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as the weights it represents."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.logical_numel() for m in model.modules() if hasattr(m, "logical_numel"))
    return trainable, total


def lora_summary(model: nn.Module) -> str:
    """One line: trainable and total parameters and the trainable share."""
    trainable, total = parameter_counts(model)
    layers = len(lora_layers(model))
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f} || LoRA layers: {layers}"
    )
