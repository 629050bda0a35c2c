"""Text generation with our own sampling loop: prompts from records, tokens, streamed text.

The loops call the model themselves with the Hugging Face KV cache (the prompt once, then one
token at a time) instead of `model.generate`, so they work the same on any model we build: 4-bit
layers and LoRA layers are ordinary modules, and nothing depends on generation-config defaults.
Greedy when temperature is 0; otherwise temperature and nucleus (top-p) sampling drawn from a
seeded torch.Generator, so a seed gives the same text every time on the same machine.

Many prompts (`greedy_batch`, `generate_batch`) run sorted by length, so a batch holds prompts of
about one length and little padding; each batch stops as soon as every row has written a stop
token, and the answers come back in the prompts' order. Both loops run with the 4-bit weights
dequantized once (`inference.dequantized_for_inference`), not at every token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .data.records import Record
from .data.render import ensure_chat_template
from .errors import DataError, GenerationError
from .inference import dequantized_for_inference

# Chat templates end an assistant turn with one of these rather than (only) the tokenizer's eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")
_REPLACEMENT_CHAR = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


def _last_assistant(record: Record) -> int:
    turns = [i for i, m in enumerate(record.messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{record.source}: the conversation has no assistant turn, so no prompt and answer")
    return turns[-1]


def prompt_messages(record: Record) -> list[dict] | str:
    """The prompt of a record: the turns before its last assistant turn, or its plain-text prompt."""
    if record.messages is not None:
        return record.messages[: _last_assistant(record)]
    if record.train_on_prompt:
        raise DataError(f"{record.source}: a 'text' record has no prompt to complete; "
                        "use chat, alpaca or prompt/completion records to generate from")
    return record.prompt


def reference(record: Record) -> str:
    """The answer a record expects: its last assistant turn, or its completion."""
    if record.messages is not None:
        return record.messages[_last_assistant(record)]["content"]
    if record.train_on_prompt:
        raise DataError(f"{record.source}: a 'text' record has no prompt, so no reference answer")
    return record.completion


def encode_prompt(tokenizer, prompt: list[dict] | str) -> list[int]:
    """Token ids of a prompt, ending where the model should start writing (as in training)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        if not ids and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id]  # what training puts before a completion with no prompt
    else:
        ensure_chat_template(tokenizer)
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GenerationError("the prompt is empty and the tokenizer has no BOS token to start from; give a prompt")
    return list(ids)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end generation: the tokenizer's eos and the end-of-turn tokens it knows."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(ids))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode (no dropout) and give each its own training flag back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _config_eos_ids(model: nn.Module) -> list[int]:
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _context_limit(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from (V,) float32 logits: greedy, or temperature + nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # The nucleus: the most likely tokens until their mass reaches top_p (the first always stays).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[choice])


def _cached_forward(model: nn.Module) -> Callable[..., tuple[torch.Tensor, object]]:
    """`run(cache, **inputs) -> (last-position logits (B, V), grown cache)` for `model`.

    The cache goes in under the name the model's forward takes (`cache` in transformers 5.24+,
    `past_key_values` before), and only the last position's logits are computed where it can.
    """
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def run(cache, **inputs) -> tuple[torch.Tensor, object]:
        out = model(**inputs, **{name: cache}, use_cache=True, **extra)
        grown = getattr(out, "cache", None)
        return out.logits[:, -1], grown if grown is not None else out.past_key_values

    return run


@torch.inference_mode()
def _step(run, ids: torch.Tensor, cache, sampling: tuple) -> tuple[int, object]:
    """Run (1, T) new ids through the model with the cache; the next token and the grown cache."""
    logits, cache = run(cache, input_ids=ids)
    return _sample(logits[0].float(), *sampling), cache  # (V,) float32 logits


def generate_tokens(
    model: nn.Module,
    input_ids: Sequence[int],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_ids: Iterable[int] | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one until an eos id (not yielded) or `max_new_tokens`.

    `eos_token_ids=None` takes the model's configured eos ids; `[]` never stops early. The model is
    in eval mode, its 4-bit layers dequantized (`dequantized_for_inference`), while the iterator
    runs; it gets its training flags and 4-bit layers back when the iterator ends or is closed.
    """
    _check_settings(max_new_tokens, temperature, top_p)
    if len(input_ids) == 0:
        raise GenerationError("generate_tokens needs at least one prompt token")
    limit = _context_limit(model)
    if limit is not None and len(input_ids) >= limit:
        raise GenerationError(f"the prompt has {len(input_ids)} tokens but the model's context is {limit}; "
                              "shorten the prompt")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - len(input_ids))
    stop = set(_config_eos_ids(model) if eos_token_ids is None else eos_token_ids)
    device = model_device(model)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    sampling = (temperature, top_p, generator)
    return _loop(model, torch.tensor([list(input_ids)], device=device), max_new_tokens, stop, sampling)


def _loop(model, ids: torch.Tensor, max_new_tokens: int, stop: set[int], sampling) -> Iterator[int]:
    # Inference mode is entered per step, never held across a yield, so it cannot leak to the caller.
    # Eval mode and the dequantized weights last until the iterator ends or is closed.
    with eval_mode(model), dequantized_for_inference(model):
        run, cache = _cached_forward(model), None
        for _ in range(max_new_tokens):
            token, cache = _step(run, ids, cache, sampling)
            if token in stop:
                return
            yield token
            ids = torch.tensor([[token]], device=ids.device)


def stream_text(tokenizer, token_iter: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
    """Text pieces as tokens arrive; a character split across tokens comes out once it is whole.

    The pieces join to exactly `tokenizer.decode(all ids)` for tokenizers whose decode of a
    longer sequence extends that of a shorter one (byte-level BPE, as used by current models).
    """
    ids: list[int] = []
    emitted = 0
    text = ""
    for token in token_iter:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if len(text) > emitted and not text.endswith(_REPLACEMENT_CHAR):
            yield text[emitted:]
            emitted = len(text)
    if len(text) > emitted:  # a truncated character at the very end: give what decode gives
        yield text[emitted:]


def generate_text(model: nn.Module, tokenizer, prompt: list[dict] | str, **kw) -> str:
    """The model's answer to a chat or plain-text prompt; `kw` go to generate_tokens."""
    kw.setdefault("eos_token_ids", stop_token_ids(tokenizer))
    tokens = list(generate_tokens(model, encode_prompt(tokenizer, prompt), **kw))
    return tokenizer.decode(tokens)


def greedy_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    eos_token_ids: Iterable[int] | None = None,
    batch_size: int = 32,
    pad_token_id: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of many prompts (token ids), in the prompts' order; stop ids not included.

    Prompts run `batch_size` at a time, longest first, left-padded, with the KV cache and the
    4-bit weights dequantized once; a batch ends when every row has stopped. `eos_token_ids=None`
    takes the model's configured eos ids. `on_progress(done, total)` is called with 0 before the
    first batch and after each batch with the number of prompts answered so far.
    """
    _check_settings(max_new_tokens, 0.0, 1.0)
    if batch_size < 1:
        raise GenerationError(f"batch_size must be at least 1, got {batch_size}")
    limit = _context_limit(model)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} has no token; every prompt needs at least one")
        if limit is not None and len(p) >= limit:
            raise GenerationError(f"prompt {i} has {len(p)} tokens but the model's context is {limit}; shorten it")
    stop = set(_config_eos_ids(model) if eos_token_ids is None else eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[list[int]] = [[] for _ in prompts]
    if on_progress is not None:
        on_progress(0, len(prompts))
    device = model_device(model)
    with eval_mode(model), dequantized_for_inference(model), torch.inference_mode():
        run = _cached_forward(model)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            budgets = [max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompts[i])) for i in rows]
            batch = [list(prompts[i]) for i in rows]
            for i, tokens in zip(rows, _greedy_rows(run, batch, budgets, stop, pad_token_id, device), strict=True):
                answers[i] = tokens
            if on_progress is not None:
                on_progress(start + len(rows), len(prompts))
    return answers


def _greedy_rows(run, prompts: list[list[int]], budgets: list[int], stop: set[int], pad_id: int,
                 device: torch.device) -> list[list[int]]:
    """Greedy tokens of one left-padded batch, one forward per token; ends when every row has stopped."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    out: list[list[int]] = [[] for _ in prompts]
    running = [b > 0 for b in budgets]
    cache = None
    while any(running):
        logits, cache = run(cache, input_ids=ids, attention_mask=mask, position_ids=positions)  # (B, V)
        tokens = logits.float().argmax(-1).tolist()
        for row, token in enumerate(tokens):
            if not running[row]:
                continue
            if token in stop:
                running[row] = False
                continue
            out[row].append(token)
            running[row] = len(out[row]) < budgets[row]
        ids = torch.tensor([[t] for t in tokens], device=device)  # a stopped row's token is never read
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict] | str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers to many chat or plain-text prompts, in their order (see `greedy_batch`).

    Batching matters most for a 4-bit model: one forward of a batch of 32 costs little more than
    one of a single prompt, so the per-token cost is shared.
    """
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    tokens = greedy_batch(model, encoded, max_new_tokens, stops, batch_size, pad_id, on_progress)
    return [tokenizer.decode(t) for t in tokens]
