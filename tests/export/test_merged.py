"""merge_lora and save_merged: plain float models that reproduce the adapter model's logits."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import qlorafit
from qlorafit.errors import QlorafitError
from qlorafit.lora.layer import LoraLinear
from qlorafit.quant.linear4bit import Linear4bit
from tests.conftest import token_batch


def _adapted(folder, quant):
    model, _ = qlorafit.load_model(folder, quant=quant)
    qlorafit.add_lora(model, r=4, alpha=8, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_saved_merged_folder_reproduces_adapter_logits(arch, quant, tiny_model_dir, tmp_path):
    model = _adapted(tiny_model_dir(arch), quant)
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
    qlorafit.save_merged(model, None, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(x).logits
    # Same weights (dequantized base + s*BA, in float32); only the summation order differs.
    assert (got - expected).abs().max() < 1e-4
    # The model in memory still has its adapter and its 4-bit layers.
    assert any(isinstance(m, LoraLinear) for m in model.modules())
    assert any(isinstance(m, Linear4bit) for m in model.modules()) == (quant != "none")


def test_merge_lora_returns_plain_model_with_same_logits(tiny_model_dir):
    model = _adapted(tiny_model_dir("llama"), "nf4")
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
    plain = qlorafit.merge_lora(model)
    assert not any(isinstance(m, (LoraLinear, Linear4bit)) for m in plain.modules())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        assert (plain(x).logits - expected).abs().max() < 1e-4


def test_half_precision_export_and_refusal_to_overwrite(tiny_model_dir, tmp_path):
    model = _adapted(tiny_model_dir("llama"), "nf4")
    out = tmp_path / "m16"
    qlorafit.save_merged(model, None, out, dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(QlorafitError, match="exists and is not empty"):
        qlorafit.save_merged(model, None, out)
    assert sorted(p.name for p in out.iterdir()) == before
