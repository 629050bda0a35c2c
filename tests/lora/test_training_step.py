"""Gradients reach the adapters through 4-bit layers, and only the adapters."""

import pytest
import torch

import qlorafit
from tests.conftest import token_batch


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_a_few_steps_lower_the_loss_and_touch_only_lora(quant, tiny_model_dir):
    model, _ = qlorafit.load_model(tiny_model_dir("llama"), quant=quant)
    qlorafit.add_lora(model, r=8, alpha=16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    packed = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    model.train()
    x = token_batch(shape=(4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers() if n in packed)
    assert len(packed) == (14 if quant == "nf4" else 0)
