"""Adapters in PEFT's layout: ours load in peft 0.21.2 and PEFT's load in ours, same logits."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import qlorafit
from qlorafit.errors import AdapterError
from qlorafit.lora.inject import lora_layers
from tests.conftest import LazyPeer, token_batch

peft = LazyPeer("peft")

ARCHS = ["llama", "qwen2", "gpt2"]


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft_with_same_logits(arch, rslora, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(arch)
    model, _ = qlorafit.load_model(folder, quant="none")
    qlorafit.add_lora(model, r=4, alpha=16, dropout=0.05, targets="all-linear", rslora=rslora)
    _randomize_lora(model)
    qlorafit.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["use_rslora"] is rslora and config["bias"] == "none" and config["task_type"] == "CAUSAL_LM"

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    x = token_batch()
    with torch.no_grad():
        ours, theirs = model(x).logits, peft_model(x).logits
    assert (ours - theirs).abs().max() < 1e-4
    # The adapter does change the output (B is non-zero), so the comparison means something.
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(x).logits
    assert (base - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_in_ours_with_same_logits(arch, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                          fan_in_fan_out=arch == "gpt2")
    peft_model = peft.get_peft_model(ref, cfg).eval()
    _randomize_lora(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "peft")

    model, _ = qlorafit.load_model(folder, quant="none")
    qlorafit.load_adapter(model, tmp_path / "peft")
    assert len(lora_layers(model)) == 2 * len(targets)
    x = token_batch()
    with torch.no_grad():
        assert (model(x).logits - peft_model(x).logits).abs().max() < 1e-4


def test_adapter_from_another_model_is_refused_with_every_problem(tiny_model_dir, tmp_path):
    model, _ = qlorafit.load_model(tiny_model_dir("llama"), quant="none")
    qlorafit.add_lora(model, r=4, alpha=8, targets=["q_proj", "k_proj"])
    qlorafit.save_adapter(model, tmp_path / "a")
    other, _ = qlorafit.load_model(tiny_model_dir("qwen2"), quant="none")
    qlorafit.add_lora(other, r=4, alpha=8, targets=["q_proj", "k_proj"])
    # Same names, different shapes: rank 4 but qwen2's k_proj output is 32 wide as well; break it with r.
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    w = load_file(tmp_path / "a" / "adapter_model.safetensors")
    w = {k: torch.cat([v, v], dim=0) if "lora_A" in k else v for k, v in w.items()}
    save_file(w, bad / "adapter_model.safetensors")
    fresh, _ = qlorafit.load_model(tiny_model_dir("llama"), quant="none")
    with pytest.raises(AdapterError, match=r"8 problems.*lora_A.weight: shape \(8, 64\) does not fit the model's \(4, 64\)"):
        qlorafit.load_adapter(fresh, bad)


def test_missing_and_corrupt_adapter_files(tiny_model_dir, tmp_path):
    model, _ = qlorafit.load_model(tiny_model_dir("llama"), quant="none")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        qlorafit.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterError, match="not valid JSON"):
        qlorafit.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj"], "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        qlorafit.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        qlorafit.load_adapter(model, tmp_path)


def test_save_without_lora_is_an_error(tiny_model_dir, tmp_path):
    model, _ = qlorafit.load_model(tiny_model_dir("llama"), quant="none")
    with pytest.raises(AdapterError, match="no LoRA layers"):
        qlorafit.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())
    assert isinstance(model.get_output_embeddings(), nn.Linear)
