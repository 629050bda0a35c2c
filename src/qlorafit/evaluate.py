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
from torch import nn

from .data.batches import pad_batch
from .data.records import Record
from .data.render import Example
from .errors import DataError
from .fileio import atomic_write
from .generate import eval_mode, generate_batch, model_device, prompt_messages, reference
from .progress import task
from .quant.blockwise import dequant_workspace
from .train.loss import causal_lm_loss


def exact_match(
    model: nn.Module,
    tokenizer,
    records: list[Record],
    max_new_tokens: int = 64,
    on_prediction: Callable[[dict], None] | None = None,
    batch_size: int = 32,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[float, list[dict]]:
    """Share of records whose greedy answer equals the reference (both stripped), and every prediction.

    The answers come from `generate_batch` (prompts batched by length, KV cache, 4-bit weights
    dequantized once); `on_progress(done, total)` counts answered prompts as batches finish, and
    `on_prediction(row)` then sees each prediction in the records' order.
    """
    if not records:
        raise DataError("exact_match needs at least one record to evaluate")
    prompts = [prompt_messages(r) for r in records]
    expected = [reference(r) for r in records]  # a record without one fails before any generation
    answers = generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size, on_progress)
    predictions = []
    for record, prompt, answer, ref in zip(records, prompts, answers, expected, strict=True):
        row = {"source": record.source, "prompt": prompt, "prediction": answer, "reference": ref,
               "correct": answer.strip() == ref.strip()}
        predictions.append(row)
        if on_prediction is not None:
            on_prediction(row)
    return sum(p["correct"] for p in predictions) / len(predictions), predictions


def loss_totals(model: nn.Module, batches: list[list[Example]], pad_id: int = 0) -> tuple[float, int]:
    """(sum of token cross-entropies, labelled tokens) over batches of examples, without dropout."""
    device = model_device(model)
    total, tokens = 0.0, 0
    with eval_mode(model), dequant_workspace(), torch.inference_mode(), \
            task("eval loss", len(batches), "batch") as bar:
        for examples in batches:
            batch = pad_batch(examples, pad_id)
            loss_sum, count = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            total, tokens = total + float(loss_sum), tokens + count
            bar.update()
    return total, tokens


def loss_metrics(total: float, tokens: int) -> dict:
    """Mean loss per token, its perplexity and the token count, from `loss_totals`."""
    if tokens == 0:
        raise DataError("the evaluation examples have no labelled token to compute a loss on")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def eval_loss(model: nn.Module, examples: list[Example], batch_size: int = 4, pad_id: int = 0) -> dict:
    """Token-weighted mean cross-entropy over all labelled tokens, its perplexity and the token count."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    batches = [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    return loss_metrics(*loss_totals(model, batches, pad_id))


def write_predictions(path: str | os.PathLike, predictions: list[dict]) -> None:
    """Write predictions as JSONL, one object a line; a failure leaves an existing file untouched."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
