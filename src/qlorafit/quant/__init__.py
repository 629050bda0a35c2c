"""Block-wise 4-bit (NF4, FP4) and 8-bit (dynamic map) quantization, bit-exact with bitsandbytes."""
