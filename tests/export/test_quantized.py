"""save_quantized: our 4-bit folders load in transformers + bitsandbytes, unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import qlorafit
from qlorafit.errors import QlorafitError
from qlorafit.quant.linear4bit import Linear4bit
from tests.conftest import peer, token_batch


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_saved_4bit_folder_loads_in_transformers_and_back(arch, quant_type, double_quant, tiny_model_dir, tmp_path):
    peer("bitsandbytes")  # transformers reads the folder through it
    model, _ = qlorafit.load_model(tiny_model_dir(arch), quant=quant_type, double_quant=double_quant)
    qlorafit.add_lora(model, r=4, alpha=8)  # LoRA layers are left out of the base folder
    out = qlorafit.save_quantized(model, None, tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = {n.replace(".base_layer", ""): m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    compared = [name for name, _ in theirs.named_modules() if name in ours]
    assert ours and sorted(compared) == sorted(ours)  # every 4-bit layer came back as a 4-bit layer
    for name in compared:
        assert torch.equal(theirs.get_submodule(name).weight.data, ours[name].weight)
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits  # B = 0: the adapter changes nothing
        assert (theirs(x).logits - expected).abs().max() < 1e-4
    again, _ = qlorafit.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)


def test_refuses_a_float_model(tiny_model_dir, tmp_path):
    model, _ = qlorafit.load_model(tiny_model_dir("llama"), quant="none")
    with pytest.raises(QlorafitError, match="no 4-bit layers"):
        qlorafit.save_quantized(model, None, tmp_path / "q")
    assert not (tmp_path / "q").exists()
