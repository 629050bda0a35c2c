"""Building a transformers model without allocating its weights.

`empty_model(config)` constructs the model with every parameter on the meta device (no
memory, no random init) while buffers computed in `__init__` (rotary frequencies, causal
masks) stay real. The loader then fills parameters one tensor at a time, so peak memory
follows the final model, not a full-precision copy of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside this block every newly registered nn.Parameter is moved to the meta device."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def empty_model(config, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM for `config` with parameters on the meta device and real buffers."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval()


def meta_parameters(model: nn.Module) -> list[str]:
    """Names of parameters still on the meta device (never loaded)."""
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Install `value` as the parameter or buffer `name` (frozen), replacing what was there."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
