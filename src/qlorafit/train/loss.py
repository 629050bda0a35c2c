"""Cross-entropy on labelled positions only, in chunks, so the tokens x vocab logits never exist whole.

The decoder runs once; then only the hidden states of positions that have a label reach the
LM head, a chunk of rows at a time, each chunk under activation checkpointing: its logits are
recomputed in backward instead of kept. Memory for the head goes from (tokens x vocab) to
(chunk x vocab); on a 49k vocabulary and 1024 tokens that is 200 MB down to a few MB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.render import IGNORE

CHUNK_ROWS = 1024


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


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over labelled positions, number of labelled positions)."""
    hidden, targets = labelled_hidden(model, batch)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss_sum, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _head_loss_sum(h, t, head, softcap)
    return total, targets.numel()
