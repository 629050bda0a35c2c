"""Cross-entropy on labelled positions only, in chunks, so the tokens x vocab logits never exist whole.

The decoder runs once; then only the hidden states of positions that have a label reach the
LM head, a chunk of rows at a time. For the usual frozen linear head, `_HeadCrossEntropy`
does forward and backward by hand: each chunk's logits become the softmax gradient in place,
and only the (rows x hidden) gradient is kept for backward. Memory for the head goes from
(tokens x vocab) logits plus their log-softmax and gradient to one chunk of about 64 MiB. Other heads (trainable, LoRA-wrapped,
quantized, soft-capped) run the chunks under activation checkpointing instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.render import IGNORE

CHUNK_BYTES = 64 * 1024 * 1024


def _chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i) for a frozen weight, chunk by chunk; logits never kept.

    The loss is linear in its upstream gradient, so forward computes each chunk's gradient
    with respect to the hidden states, (softmax - onehot) @ weight, while the chunk's logits
    are at hand, and backward only scales it: one pass over the head instead of two.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, targets.numel(), rows):
            end = min(start + rows, targets.numel())
            logits = (hidden[start:end] @ weight.t()).float()
            t = targets[start:end].unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += lse.sum() - logits.gather(1, t).sum()
            if need_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, t, torch.full_like(t, -1.0, dtype=probs.dtype))
                grad_hidden[start:end] = probs.to(weight.dtype) @ weight
            del logits
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def _plain_head_weight(head: nn.Module) -> torch.Tensor | None:
    """The weight of a frozen, bias-free nn.Linear head, else None."""
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        return head.weight
    return None


def _head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def labelled_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states of positions whose next token is labelled, those next tokens)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over labelled positions, number of labelled positions)."""
    hidden, targets = labelled_hidden(model, batch)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    weight = _plain_head_weight(head)
    chunk_rows = chunk_rows or _chunk_rows(head.out_features if hasattr(head, "out_features") else 65536)
    if weight is not None and not softcap and weight.dtype == hidden.dtype:
        return _HeadCrossEntropy.apply(hidden, weight, targets, chunk_rows), targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss_sum, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _head_loss_sum(h, t, head, softcap)
    return total, targets.numel()
