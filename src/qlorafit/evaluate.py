"""Evaluation: exact-match accuracy of greedy answers, and loss / perplexity on labelled tokens.

`eval_loss` weights every labelled token the same (sum of token losses over all examples, then
one division by their count), so a long example counts for more than a short one and the result
does not depend on batch size or on how examples fall into batches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data.batches import pad_batch
from .data.records import Record
from .data.render import IGNORE, Example
from .errors import DataError
from .generate import eval_mode, generate_text, model_device, prompt_messages, reference

_LOSS_CHUNK_ROWS = 2048  # float32 (rows x vocab) pieces of the logits at a time


def exact_match(
    model: nn.Module,
    tokenizer,
    records: list[Record],
    max_new_tokens: int = 64,
    on_prediction: Callable[[dict], None] | None = None,
) -> tuple[float, list[dict]]:
    """Share of records whose greedy answer equals the reference (both stripped), and every prediction."""
    if not records:
        raise DataError("exact_match needs at least one record to evaluate")
    predictions = []
    for record in records:
        prompt, expected = prompt_messages(record), reference(record)
        answer = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        row = {"source": record.source, "prompt": prompt, "prediction": answer, "reference": expected,
               "correct": answer.strip() == expected.strip()}
        predictions.append(row)
        if on_prediction is not None:
            on_prediction(row)
    return sum(p["correct"] for p in predictions) / len(predictions), predictions


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, int]:
    """Summed float32 cross-entropy of one padded batch's labelled tokens, and their count."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    targets = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
    keep = targets != IGNORE
    rows, targets = logits[:, :-1][keep], targets[keep]  # (N, V), (N,)
    total = 0.0
    for start in range(0, len(targets), _LOSS_CHUNK_ROWS):
        chunk = rows[start : start + _LOSS_CHUNK_ROWS].float()
        total += float(F.cross_entropy(chunk, targets[start : start + _LOSS_CHUNK_ROWS], reduction="sum"))
    return total, int(keep.sum())


def eval_loss(model: nn.Module, examples: list[Example], batch_size: int = 4, pad_id: int = 0) -> dict:
    """Token-weighted mean cross-entropy over all labelled tokens, its perplexity and the token count."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    device = model_device(model)
    total, tokens = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            loss_sum, count = _batch_loss(model, pad_batch(examples[start : start + batch_size], pad_id), device)
            total, tokens = total + loss_sum, tokens + count
    if tokens == 0:
        raise DataError("the evaluation examples have no labelled token to compute a loss on")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def write_predictions(path: str | os.PathLike, predictions: list[dict]) -> None:
    """Write predictions as JSONL, one object a line; a failure leaves an existing file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
