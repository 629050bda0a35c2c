"""Dequantized inference: float weights for generation, the very same 4-bit modules back after."""

from __future__ import annotations

import logging

import pytest
import torch

import qlorafit
from qlorafit.generate import generate_tokens, greedy_batch
from qlorafit.inference import DequantizedLinear, dequantized_for_inference
from qlorafit.lora.inject import lora_layers
from tests.conftest import byte_tokenizer, token_batch
from tests.test_generate import PROMPT, byte_model, with_random_lora


def four_bit_sites(model) -> dict[str, object]:
    return {name: m for name, m in model.named_modules() if isinstance(m, qlorafit.Linear4bit)}


def full_recompute_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy ids by running the whole sequence each step: the model as it is, no cache, no swap."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lively-chat")
    byte_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("lora", [False, True])
def test_float_weights_inside_the_same_4bit_modules_after_and_identical_greedy_ids(nf4_dir, lora):
    model, _ = qlorafit.load_model(nf4_dir, quant="nf4")
    if lora:
        with_random_lora(model)
    model.eval()
    before = four_bit_sites(model)
    keys = list(model.state_dict())
    x = token_batch(vocab=model.config.vocab_size)
    with torch.inference_mode():
        logits = model(x).logits
    greedy = full_recompute_greedy(model, PROMPT, 12)
    assert len(set(greedy)) > 3
    with dequantized_for_inference(model) as same:
        assert same is model and not four_bit_sites(model)
        swapped = {name: model.get_submodule(name) for name in before}
        assert all(type(m) is DequantizedLinear and not m.weight.requires_grad for m in swapped.values())
        if lora:  # the swap happens inside the LoRA layers
            assert all(isinstance(layer.base_layer, DequantizedLinear) for layer in lora_layers(model).values())
        with torch.inference_mode():
            assert torch.equal(model(x).logits, logits)  # the same float ops on the same weights
        assert full_recompute_greedy(model, PROMPT, 12) == greedy
        assert list(generate_tokens(model, PROMPT, max_new_tokens=12, eos_token_ids=[])) == greedy
    after = four_bit_sites(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert list(model.state_dict()) == keys
    assert greedy_batch(model, [PROMPT], max_new_tokens=12, eos_token_ids=[]) == [greedy]


def test_modules_come_back_on_an_exception_and_nesting_is_a_no_op(nf4_dir):
    model, _ = qlorafit.load_model(nf4_dir, quant="nf4")
    before = four_bit_sites(model)
    with pytest.raises(RuntimeError, match="boom"), dequantized_for_inference(model):
        with dequantized_for_inference(model):
            assert not four_bit_sites(model)
        assert not four_bit_sites(model)  # the inner exit restored nothing of the outer swap
        raise RuntimeError("boom")
    after = four_bit_sites(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_nothing_is_swapped_when_the_float_weights_do_not_fit(nf4_dir, caplog):
    model, _ = qlorafit.load_model(nf4_dir, quant="nf4")
    before = four_bit_sites(model)
    need = sum(m.logical_numel() * 4 for m in before.values())  # float32 compute on the CPU
    with caplog.at_level(logging.INFO, logger="qlorafit.inference"), dequantized_for_inference(model, need - 1):
        assert four_bit_sites(model) == before
    assert "keeping 4-bit weights" in caplog.text
    with dequantized_for_inference(model, need):
        assert not four_bit_sites(model)


def test_training_after_inference_sees_the_4bit_layers_and_gets_gradients(nf4_dir):
    model, _ = qlorafit.load_model(nf4_dir, quant="nf4")
    with_random_lora(model)
    with dequantized_for_inference(model):
        pass
    model.train()
    x = token_batch(vocab=model.config.vocab_size)
    model(x, labels=x).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(isinstance(layer.base_layer, qlorafit.Linear4bit) for layer in lora_layers(model).values())


def test_generate_tokens_dequantizes_while_it_runs_and_gives_the_4bit_layers_back(nf4_dir):
    model, _ = qlorafit.load_model(nf4_dir, quant="nf4")
    before = four_bit_sites(model)
    tokens = generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[])
    next(tokens)
    assert not four_bit_sites(model)  # float weights while the iterator is open
    tokens.close()
    after = four_bit_sites(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
