"""load_model: any causal LM checkpoint into a (quantized) transformers model, streamed.

The model is built on the meta device; tensors are then read one at a time (safetensors
memory maps, the GGUF reader) and each linear weight is quantized the moment it arrives, so
the full-precision model never exists in memory. Folders saved with bitsandbytes 4-bit keys
are taken as they are: their codes and scales are installed without re-quantization.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..lora.inject import _output_head_names
from ..lora.layer import Conv1D
from ..progress import task
from ..quant.blockwise import check_4bit_settings
from ..quant.linear4bit import Linear4bit
from ..quant.param4bit import quantize_parameter
from ..quant.state import QuantState, is_quant_state_key
from ..sysmem import release_freed_memory
from .checkpoint import ModelSource, resolve_model, stream_safetensors
from .conversions import CheckpointLayout
from .meta import empty_model, meta_parameters, set_tensor
from .numerics import resolve_compute_dtype, resolve_device

logger = logging.getLogger(__name__)


_TRIM_ELEMENTS = 1 << 20


QUANT_CHOICES = ("nf4", "fp4", "none")


def _quantizable(model: nn.Module) -> set[str]:
    """Names of the layers to store in 4 bits: every linear layer but the output head."""
    heads = _output_head_names(model)
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n not in heads}


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, modules) of the model's stack of decoder layers: its ModuleList with the most parameters."""
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = (name, module), n
    return best


def _loaded(module: nn.Module) -> bool:
    return not any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


class _Streamer:
    """Puts streamed tensors into an empty model, quantizing linear weights on arrival.

    `on_layer(name, layer)` is called once for each decoder layer, as soon as the last of its
    tensors has arrived (what is left, when streaming ends).
    """

    def __init__(self, model: nn.Module, quant: str, double_quant: bool, blocksize: int, dtype: torch.dtype, device,
                 on_layer: Callable[[str, nn.Module], None] | None = None):
        self.model, self.quant, self.dtype, self.device = model, quant, dtype, device
        self.on_layer = on_layer
        stack = layer_stack(model) if on_layer is not None else None
        self.pending = {f"{stack[0]}.{i}": layer for i, layer in enumerate(stack[1])} if stack else {}
        self.qkw = dict(quant_type=quant, blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype)
        self.targets = _quantizable(model) if quant != "none" else set()
        self.buffers = {n for n, _ in model.named_buffers()}
        self.names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | self.buffers
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def _model_name(self, key: str) -> str | None:
        if key in self.names:
            return key
        if self.prefix and f"{self.prefix}.{key}" in self.names:
            return f"{self.prefix}.{key}"
        return None

    def put(self, key: str, tensor: torch.Tensor, source: str) -> None:
        name = self._model_name(key)
        if name is None:
            logger.info("%s: ignoring tensor %s, which this model does not use", source, key)
            return
        module_name, _, attr = name.rpartition(".")
        expected = None if name in self.buffers else self.model.get_parameter(name)
        if expected is not None and tuple(expected.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)} but the model built from its config "
                f"expects {tuple(expected.shape)}; the checkpoint and its config.json do not match"
            )
        tensor = tensor.to(self.device)
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        big = tensor.numel() >= _TRIM_ELEMENTS
        if module_name in self.targets:
            self._put_quantized(module_name, attr, tensor)
        elif self.quant != "none" and tensor.dim() == 3 and expected is not None:
            # fused MoE experts (experts, out, in): 4-bit over the flattened values
            quantize_parameter(self.model.get_submodule(module_name), attr, tensor, **self.qkw)
        else:
            set_tensor(self.model, name, tensor)
        del tensor
        self._layer_done(name)
        if big:
            release_freed_memory()

    def _layer_done(self, name: str) -> None:
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            layer_name = ".".join(parts[:end])
            if layer_name in self.pending:
                layer = self.model.get_submodule(layer_name)  # put may have replaced its children
                if _loaded(layer):
                    del self.pending[layer_name]
                    self.on_layer(layer_name, layer)
                return

    def finish(self) -> None:
        """Hand over the layers whose last tensors never came (checked for completeness after)."""
        for layer_name in list(self.pending):
            del self.pending[layer_name]
            layer = self.model.get_submodule(layer_name)
            if _loaded(layer):  # a layer still missing weights is reported by the completeness check
                self.on_layer(layer_name, layer)

    def _put_quantized(self, module_name: str, attr: str, tensor: torch.Tensor) -> None:
        module = self.model.get_submodule(module_name)
        if attr == "bias":
            if isinstance(module, Linear4bit):
                module.bias = nn.Parameter(tensor, requires_grad=False)
            else:
                set_tensor(self.model, f"{module_name}.bias", tensor)
            return
        conv = isinstance(module, Conv1D)
        weight = tensor.t() if conv else tensor  # Conv1D stores (in, out)
        bias = module.bias if module.bias is not None and module.bias.device.type != "meta" else None
        layer = Linear4bit.from_weight(weight, bias, **self.qkw)
        if module.bias is not None and bias is None:
            layer.bias = nn.Parameter(torch.empty(layer.out_features, device="meta"), requires_grad=False)
        layer.conv1d_layout = conv
        self.model.set_submodule(module_name, layer)


def _finish(model: nn.Module, source: str) -> nn.Module:
    """Tie shared weights and make sure nothing was left unloaded."""
    model.tie_weights()
    missing = meta_parameters(model)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ModelLoadError(f"{source}: the checkpoint lacks weights the model needs: {shown}")
    for p in model.parameters():
        p.requires_grad_(False)
    release_freed_memory()  # the quantizer's temporaries, freed but still held by the allocator
    return model


def _load_bnb_modules(model: nn.Module, keys: dict[str, Path], read, dtype: torch.dtype, device) -> set[str]:
    """Install pre-quantized bitsandbytes layers; returns the keys consumed."""
    used: set[str] = set()
    for key in keys:
        if ".weight.quant_state.bitsandbytes__" not in key:
            continue
        module_name = key.split(".weight.quant_state.")[0]
        prefix = module_name + ".weight."
        state_items = {k[len(prefix) :]: read(k) for k in keys if k.startswith(prefix) and is_quant_state_key(k)}
        state = QuantState.from_dict(state_items, device=device)
        packed = read(module_name + ".weight").to(device)
        old = model.get_submodule(module_name)
        out_features, in_features = state.shape
        layer = Linear4bit(in_features, out_features, packed, state, None, dtype)
        layer.conv1d_layout = isinstance(old, Conv1D)
        if getattr(old, "bias", None) is not None:
            layer.bias = nn.Parameter(read(module_name + ".bias").to(device, dtype), requires_grad=False)
            used.add(module_name + ".bias")
        model.set_submodule(module_name, layer)
        used |= {module_name + ".weight", *(prefix + k for k in state_items)}
    return used


def load_model(
    path: str | os.PathLike,
    quant: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    on_layer: Callable[[str, nn.Module], None] | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, with linear layers stored as 4-bit (or not, quant="none").

    `path` is a Hugging Face model folder (safetensors, single or sharded), a `.gguf` file, the
    alias `smollm2-135m-instruct`, or a folder saved with bitsandbytes 4-bit weights. Pickled
    `pytorch_model*.bin` weights are read only with `allow_pickle=True` (and then with
    `torch.load(weights_only=True)`); model code shipped with a checkpoint runs only with
    `trust_remote_code=True`. `on_layer(name, layer)` is called once per decoder layer as soon as
    it is loaded (sharding it across processes there keeps the whole base from ever being held).
    """
    if quant not in QUANT_CHOICES:
        raise ModelLoadError(f"unknown quant {quant!r}: use one of {', '.join(QUANT_CHOICES)}")
    if quant != "none":
        check_4bit_settings(quant, blocksize)
    device = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, device)
    source = resolve_model(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    model = empty_model(source.config, trust_remote_code=trust_remote_code)
    streamer = _Streamer(model, quant, double_quant, blocksize, dtype, device, on_layer)
    used: set[str] = set()
    if source.kind == "bnb4bit":
        used = _load_prequantized(model, source, dtype, device)
        streamer.targets = set()  # everything else is stored as it is
    layout = CheckpointLayout(model, str(source.path))
    with task(f"loading {source.name}", None if used else len(dict(model.named_parameters())), "tensor") as bar:
        for key, tensor, file in source.tensors(model, skip=used):
            for name, converted in layout.convert(key, tensor):
                streamer.put(name, converted, file)
            bar.update()
    layout.finish()
    streamer.finish()
    model = _finish(model, str(source.path))
    model.name_or_path = str(source.name)
    model.qlorafit_source = source.describe(quant)
    return model, source.tokenizer()


def _load_prequantized(model: nn.Module, source: ModelSource, dtype, device) -> set[str]:
    """Install the bitsandbytes 4-bit layers of a folder; returns the tensor keys they used."""
    keys = source.tensor_files()

    def read(key: str) -> torch.Tensor:
        if key not in keys:
            raise ModelLoadError(f"{source.path}: 4-bit checkpoint is missing tensor {key}")
        return next(stream_safetensors(keys[key], [key]))[1]

    return _load_bnb_modules(model, keys, read, dtype, device)


