"""Dropout masks and activation checkpointing: what the fused LoRA op draws and dequantizes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import qlorafit
from qlorafit.lora import layer as layer_module
from qlorafit.lora.layer import LoraLinear, keep_mask, release_kept_outputs
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


def _held(model) -> list[str]:
    """What the model's LoRA layers still hold between passes (kept outputs, recomputed weights)."""
    return [f"{name}.{attr}" for name, m in model.named_modules() if isinstance(m, LoraLinear)
            for attr in ("kept_output", "recomputed_weight") if getattr(m, attr) is not None]


def _grads(folder, checkpointing: str, monkeypatch) -> tuple[dict, Counter, int, list[str]]:
    """LoRA gradients of one step, dequantizations per 4-bit layer, base matmuls computed, and what
    the layers still hold after the step."""
    model, _ = qlorafit.load_model(folder, quant="nf4")
    torch.manual_seed(0)
    qlorafit.add_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():  # a non-zero B, so that every input gradient goes through the adapter too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    if checkpointing != "off":
        enable_grad_checkpointing(model, selective=checkpointing == "selective")
    calls: Counter = Counter()
    dequantize, base_output = Linear4bit.dequantize, layer_module._base_output
    matmuls = []
    monkeypatch.setattr(Linear4bit, "dequantize", lambda self, *a, **k: calls.update([id(self)]) or dequantize(self, *a, **k))
    monkeypatch.setattr(layer_module, "_base_output", lambda *a: matmuls.append(1) or base_output(*a))
    torch.manual_seed(0)
    x = token_batch()
    model(x, labels=x).loss.backward()
    held = _held(model)  # before the release: a recomputation must have used up every kept tensor
    release_kept_outputs(model)
    monkeypatch.undo()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, calls, len(matmuls), held


def test_checkpointing_dequantizes_each_weight_once_for_recomputation_and_backward(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    plain, plain_calls, plain_matmuls, _ = _grads(folder, "off", monkeypatch)
    checkpointed, calls, matmuls, held = _grads(folder, "full", monkeypatch)
    # without checkpointing: forward and backward (forward only where the input needs no gradient);
    # with it: forward and the recomputation, whose weight the backward reuses instead of a third
    assert max(plain_calls.values()) == 2 and max(calls.values()) == 2 and len(calls) == len(plain_calls)
    assert matmuls == 2 * plain_matmuls  # the recomputation redoes every base matmul
    assert held == []  # every kept weight was used and released by its backward
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_selective_checkpointing_reuses_base_outputs(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    plain, _, plain_matmuls, _ = _grads(folder, "off", monkeypatch)
    selective, calls, matmuls, held = _grads(folder, "selective", monkeypatch)
    assert matmuls == plain_matmuls  # the recomputation took each layer's kept output
    assert max(calls.values()) == 2  # forward and backward, none in the recomputation
    assert held == []
    for name, grad in plain.items():
        torch.testing.assert_close(selective[name], grad, rtol=1e-5, atol=1e-7)
