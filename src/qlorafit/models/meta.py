"""Building a transformers model without allocating its weights.

`empty_model(config)` constructs the model with every parameter on the meta device (no
memory, no random init) while buffers computed in `__init__` (rotary frequencies, causal
masks) stay real. The loader then fills parameters one tensor at a time, so peak memory
follows the final model, not a full-precision copy of it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_ORIGINAL_REGISTER = nn.Module.register_parameter
_ON_META = threading.local()  # per thread: how many parameters_on_meta blocks it is inside
_INSTALL_LOCK = threading.Lock()
_installed_blocks = 0  # blocks open in any thread; the patch is in place while this is above zero


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _ORIGINAL_REGISTER(module, name, param)
    if getattr(_ON_META, "depth", 0) and param is not None and param.device.type != "meta":
        module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside this block every nn.Parameter this thread registers is moved to the meta device.

    The flag belongs to the thread that enters the block: modules another thread builds at the
    same time keep real parameters. `nn.Module.register_parameter` is wrapped while any block is
    open and restored when the last one closes.
    """
    global _installed_blocks
    with _INSTALL_LOCK:
        if _installed_blocks == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _installed_blocks += 1
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1
        with _INSTALL_LOCK:
            _installed_blocks -= 1
            if _installed_blocks == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER  # type: ignore[method-assign]


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
