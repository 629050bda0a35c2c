"""qlorafit: LoRA and QLoRA fine-tuning of causal language models, on the hardware you have."""

from .errors import (
    AdapterError,
    DataError,
    ExportError,
    GenerationError,
    ModelLoadError,
    QlorafitError,
    QuantizationError,
    TargetError,
    TrainingError,
    TrainingInterrupted,
)
from .export.gguf import export_gguf
from .export.gguf_lora import export_lora_gguf
from .export.merged import save_merged
from .export.ollama import write_modelfile
from .export.quantized import save_quantized
from .lora.inject import LoraConfig, add_lora, lora_summary, parameter_counts
from .lora.layer import LoraLinear
from .lora.merge import merge_lora
from .lora.peft_io import load_adapter, save_adapter
from .models.load import load_model
from .quant.blockwise import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from .quant.linear4bit import Linear4bit
from .quant.state import QuantState

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "DataError",
    "ExportError",
    "GenerationError",
    "Linear4bit",
    "LoraConfig",
    "LoraLinear",
    "ModelLoadError",
    "QlorafitError",
    "QuantState",
    "QuantizationError",
    "TargetError",
    "TrainingError",
    "TrainingInterrupted",
    "add_lora",
    "dequantize_4bit",
    "dequantize_blockwise",
    "export_gguf",
    "export_lora_gguf",
    "load_adapter",
    "load_model",
    "lora_summary",
    "merge_lora",
    "parameter_counts",
    "quantize_4bit",
    "quantize_blockwise",
    "save_adapter",
    "save_merged",
    "save_quantized",
    "write_modelfile",
]
