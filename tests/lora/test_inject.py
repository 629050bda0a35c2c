"""Target matching (PEFT semantics), freezing, and the parameter summary."""

import pytest

from qlorafit.errors import TargetError
from qlorafit.lora.inject import add_lora, find_targets, lora_layers, parameter_counts
from tests.conftest import build_tiny


def test_all_linear_skips_the_output_head():
    model = build_tiny("llama")
    names = find_targets(model, "all-linear")
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    gpt2 = build_tiny("gpt2")
    assert sorted({n.split(".")[-1] for n in find_targets(gpt2)}) == ["c_attn", "c_fc", "c_proj"]


def test_suffix_list_and_regex():
    model = build_tiny("qwen2")
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, r".*\.1\.mlp\.(gate|up)_proj") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
    ]
    # PEFT semantics: a suffix must match a whole name component.
    with pytest.raises(TargetError, match="match no linear layer"):
        find_targets(model, ["proj"])


def test_no_match_and_bad_regex_raise_clear_errors():
    model = build_tiny("llama")
    with pytest.raises(TargetError, match=r"q_proj.*Use one of those names"):
        find_targets(model, ["query"])
    with pytest.raises(TargetError, match="not a valid regular expression"):
        find_targets(model, "(unclosed")


def test_add_lora_freezes_everything_else_and_counts():
    model = build_tiny("llama")
    total_before = sum(p.numel() for p in model.parameters())
    add_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_layers(model)) == 4
    t, total = parameter_counts(model)
    # per layer q (64 -> 64) and v (64 -> 32, 2 kv heads of 16); A is r x in, B is out x r
    assert t == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    assert total == total_before + t
    with pytest.raises(TargetError, match="already has LoRA"):
        add_lora(model)
