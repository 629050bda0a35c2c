"""Dropout masks and activation checkpointing: what the fused LoRA op draws and dequantizes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import qlorafit
from qlorafit.lora.layer import _RECOMPUTED, keep_mask
from qlorafit.quant.linear4bit import Linear4bit
from qlorafit.train.loop import enable_grad_checkpointing
from tests.conftest import token_batch


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size((1000, 999)), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (1000, 999)
    assert abs(mask.float().mean().item() - (1 - p)) < 3e-3
    torch.manual_seed(0)
    assert torch.equal(mask, keep_mask(torch.Size((1000, 999)), p, torch.device("cpu")))  # seeded


def _grads(folder, checkpointing: bool, monkeypatch) -> tuple[dict, Counter]:
    model, _ = qlorafit.load_model(folder, quant="nf4")
    torch.manual_seed(0)
    qlorafit.add_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():  # a non-zero B, so that every input gradient goes through the adapter too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    if checkpointing:
        enable_grad_checkpointing(model)
    calls: Counter = Counter()
    dequantize = Linear4bit.dequantize
    monkeypatch.setattr(Linear4bit, "dequantize", lambda self, *a, **k: calls.update([id(self)]) or dequantize(self, *a, **k))
    torch.manual_seed(0)
    x = token_batch()
    model(x, labels=x).loss.backward()
    monkeypatch.setattr(Linear4bit, "dequantize", dequantize)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls


def test_checkpointing_dequantizes_each_weight_once_for_recomputation_and_backward(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    plain, plain_calls = _grads(folder, False, monkeypatch)
    checkpointed, calls = _grads(folder, True, monkeypatch)
    # without checkpointing: forward and backward (forward only where the input needs no gradient);
    # with it: forward and the recomputation, whose weight the backward reuses instead of a third
    assert max(plain_calls.values()) == 2 and max(calls.values()) == 2 and len(calls) == len(plain_calls)
    assert _RECOMPUTED == {}  # every kept weight was used and released by its backward
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
