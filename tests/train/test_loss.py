"""The chunked, labelled-rows-only loss equals transformers' loss, value and gradient."""

import pytest
import torch

import qlorafit
from qlorafit.train.loss import causal_lm_loss
from qlorafit.train.schedule import lr_factor


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 9:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("chunk_rows", [1024, 3])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj", "lm_head"]])
def test_loss_and_grads_match_transformers(tiny_model_dir, chunk_rows, targets):
    """A frozen head takes the hand-written chunked path; a LoRA-wrapped head the checkpointed one."""
    model, _ = qlorafit.load_model(tiny_model_dir("llama"), quant="nf4")
    qlorafit.add_lora(model, r=4, alpha=8, targets=targets)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    batch = _batch()
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total, count = causal_lm_loss(model, batch, chunk_rows=chunk_rows)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    (total / count).backward()
    assert torch.allclose(total / count, ref, atol=1e-5)
    assert ref_grads  # there are trainable parameters to compare
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[n], atol=1e-5), n


def test_schedules():
    assert [round(lr_factor(s, 10, 2, "constant"), 3) for s in (0, 1, 2, 9)] == [0.333, 0.667, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == 0.5
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and abs(lr_factor(6, 10, 2, "cosine") - 0.5) < 1e-9
    assert lr_factor(10, 10, 0, "cosine") == 0.0
