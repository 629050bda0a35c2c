"""Block-wise 4-bit (NF4, FP4) and 8-bit (dynamic map) quantization, bit-exact with bitsandbytes.

The public API, in bitsandbytes' shape: `quantize_4bit(w) -> (packed, QuantState)` and back,
the 8-bit block-wise pair, the serializable `QuantState`, the frozen `Linear4bit` layer, the
workspace transient dequantized weights share (`dequant_workspace`), and the code books themselves. The kernel lookup tables in `codebooks` stay internal.
"""

from .blockwise import (
    dequant_workspace,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
)
from .codebooks import code_4bit, dynamic_map, unsigned_dynamic_map
from .linear4bit import Linear4bit
from .state import QuantState

__all__ = [
    "Linear4bit",
    "QuantState",
    "code_4bit",
    "dequant_workspace",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_4bit",
    "quantize_blockwise",
    "unsigned_dynamic_map",
]
