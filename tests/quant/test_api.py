"""The public quantization API imports from `qlorafit.quant`, the same objects as at the top level."""

import subprocess
import sys

import qlorafit
import qlorafit.quant as quant

PUBLIC = ["quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise", "QuantState",
          "Linear4bit", "code_4bit", "dynamic_map", "unsigned_dynamic_map", "dequant_workspace"]


def test_quant_exports_its_public_api():
    assert sorted(quant.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(quant, name) is not None
        if hasattr(qlorafit, name):
            assert getattr(qlorafit, name) is getattr(quant, name), name


def test_star_import_in_a_fresh_interpreter():
    # A fresh process, entering through qlorafit.quant first: an import cycle only shows from scratch.
    code = "from qlorafit.quant import *; import qlorafit; assert qlorafit.Linear4bit is Linear4bit"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
