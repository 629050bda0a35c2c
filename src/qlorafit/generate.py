"""Text generation with our own sampling loop: prompts from records, tokens, streamed text.

The loop calls the model itself with the Hugging Face KV cache (the prompt once, then one token
at a time) instead of `model.generate`, so it works the same on any model we build: 4-bit
layers and LoRA layers are ordinary modules, and nothing depends on generation-config defaults.
Greedy when temperature is 0; otherwise temperature and nucleus (top-p) sampling drawn from a
seeded torch.Generator, so a seed gives the same text every time on the same machine.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .data.records import Record
from .data.render import ensure_chat_template
from .errors import DataError, GenerationError

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


@torch.inference_mode()
def _step(model: nn.Module, ids: torch.Tensor, cache, keep_last: bool, sampling: tuple) -> tuple[int, object]:
    """Run (1, T) new ids through the model with the cache; the next token and the grown cache."""
    extra = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
    logits = out.logits[0, -1].float()  # (V,)
    return _sample(logits, *sampling), out.past_key_values


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
    in eval mode while the iterator runs and gets its training flags back when it ends or is closed.
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
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    sampling = (temperature, top_p, generator)
    return _loop(model, torch.tensor([list(input_ids)], device=device), max_new_tokens, stop, keep_last, sampling)


def _loop(model, ids: torch.Tensor, max_new_tokens: int, stop: set[int], keep_last: bool, sampling) -> Iterator[int]:
    # Inference mode is entered per step, never held across a yield, so it cannot leak to the caller.
    with eval_mode(model):
        cache = None
        for _ in range(max_new_tokens):
            token, cache = _step(model, ids, cache, keep_last, sampling)
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


def generate_batch(model: nn.Module, tokenizer, prompts: list[list[dict] | str], max_new_tokens: int = 64,
                   batch_size: int = 32) -> list[str]:
    """Greedy answers to many prompts, `batch_size` at a time (left-padded, one forward per token).

    Batching matters most for a 4-bit model, whose every forward dequantizes every weight:
    one batch of 32 costs about what a single prompt does.
    """
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers: list[str] = []
    device = model_device(model)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(encoded):
                ids[row, width - len(e) :] = torch.tensor(e)
                mask[row, width - len(e) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=pad_id)
            for row in out[:, width:].tolist():
                end = next((i for i, t in enumerate(row) if t in stops), len(row))
                answers.append(tokenizer.decode(row[:end]))
    return answers
