"""export_lora_gguf: the LoRA adapter alone as a llama.cpp adapter file (`llama-cli --lora`).

The file is what llama.cpp's `convert_lora_to_gguf.py` writes and `llama_adapter_lora_init`
reads: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, the base model's
architecture string, and for every adapted weight `<llama.cpp weight name>.lora_a` (r x in) and
`.lora_b` (out x r), in llama.cpp's layout (the rows of B permuted like the rows of the weight
they add to, e.g. llama's Q and K).

llama.cpp scales every pair by `alpha / r`, with one alpha for the file and r read from the
tensor. qlorafit's layers each carry their own scale (rsLoRA's `alpha / sqrt(r)`, a rank or
alpha of their own), so B is written multiplied by `scale * r / alpha`: llama.cpp then computes
exactly the update the model trained with. What llama.cpp cannot apply is refused: LoRA on an
output head tied to the embeddings (the file has no output tensor to add to), and adapters on
fused 3-D expert tensors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..lora.layer import LoraLinear
from .files import write_file
from .gguf_layout import Layout
from .kquants import quantize_tensor

log = logging.getLogger(__name__)

LORA_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
}


def lora_tensors(model: nn.Module, layout: Layout, alpha: float) -> list[tuple[str, np.ndarray]]:
    """(name, float32 array) of every lora_a / lora_b pair, B folded to llama.cpp's `alpha / r`."""
    out: list[tuple[str, np.ndarray]] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        key = f"{module_name}.weight"
        if layout.tied and module_name.endswith("lm_head"):
            raise ExportError(
                f"{module_name} has a LoRA adapter but its weight is tied to the embeddings; a llama.cpp file of a "
                "tied model has no output tensor to apply it to. Export the merged model instead (without --lora-only)."
            )
        weight_name = layout.name(key)
        if weight_name is None:
            raise ExportError(f"{module_name}: its weight has no place in a llama.cpp {layout.arch} file")
        a = module.lora_A.weight.detach().to("cpu", torch.float32).numpy()  # (r, in)
        b = module.lora_B.weight.detach().to("cpu", torch.float32).numpy()  # (out, r)
        b = b * np.float32(module.scaling * module.r / alpha)
        rows = layout.rows_of(weight_name)
        if rows is not None:
            b = rows(b)
        out.append((f"{weight_name}.lora_a", np.ascontiguousarray(a)))
        out.append((f"{weight_name}.lora_b", np.ascontiguousarray(b)))
    if not out:
        raise ExportError("the model has no LoRA layers; load an adapter first (load_adapter) or export the model")
    return out


def export_lora_gguf(model: nn.Module, path: str | os.PathLike, type: str = "f16",  # noqa: A002
                     *, name: str | None = None) -> Path:
    """Write the model's LoRA adapter as a llama.cpp LoRA GGUF file; returns the path.

    `type` is f32, f16 (default, as llama.cpp's converter) or bf16 (B has rows of r values, too short
    for llama.cpp's block types). The base model the file
    applies to is the model exported with `export_gguf` (or any GGUF of the same base weights).
    """
    qtype = LORA_TYPES.get(type.lower())
    if qtype is None:
        raise ExportError(f"unknown adapter type {type!r}; choose one of {', '.join(LORA_TYPES)}")
    config = getattr(model, "lora_config", None)
    if config is not None and getattr(config, "use_dora", False):
        raise ExportError("DoRA adapters cannot be applied by llama.cpp; export the merged model instead")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the adapter file's path, e.g. {path / 'adapter.gguf'}")
    layout = Layout(model.config)
    alphas = {float(m.alpha) for m in model.modules() if isinstance(m, LoraLinear)}
    alpha = max(alphas) if alphas else 1.0
    tensors = lora_tensors(model, layout, alpha)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), layout.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or "LoRA adapter")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, quantize_tensor(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file(path, write)
    log.info("wrote %s (LoRA adapter, %d tensors, alpha %g)", path, len(tensors), alpha)
    return path
