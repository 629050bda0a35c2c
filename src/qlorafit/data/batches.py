"""Batches: padding with length grouping, or packing several examples into one row.

Length grouping shuffles the examples, cuts the order into windows of 32 batches, sorts each
window by length and cuts it into batches, then shuffles the batches: every batch holds
examples of similar length (little padding) and the order stays random. Packing fills rows of
`max_length` tokens with whole examples; each example restarts its positions and a
block-diagonal causal mask keeps it from attending to the others in its row.
"""

from __future__ import annotations

import torch

from .render import IGNORE, Example

_WINDOW_BATCHES = 32


def batch_order(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Indices of the examples, cut into length-grouped batches, in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * _WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffled]


def pad_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (-100 on padding) and attention_mask."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_rows(examples: list[Example], order: list[int], max_length: int) -> list[list[int]]:
    """Greedy packing in `order`: lists of example indices whose lengths sum to <= max_length."""
    rows, current, used = [], [], 0
    for i in order:
        n = len(examples[i])
        if current and used + n > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def packed_batch(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: input_ids, labels, position_ids and a (B, 1, T, T) block-diagonal causal mask."""
    width = max(sum(len(e) for e in row) for row in rows)
    batch = len(rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), -1, dtype=torch.long)  # -1: padding
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(e.labels)
            positions[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = s
            at += n
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}
