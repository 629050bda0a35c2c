"""Records -> token ids and labels, with the loss on what the model should learn to write.

Chat records are rendered with the tokenizer's chat template. A tokenizer without one gets ChatML
when `<|im_start|>` and `<|im_end|>` are already in its vocabulary, and otherwise DEFAULT_TEMPLATE,
plain-text role headers with each assistant turn ended by the eos token (after the bos token when
the tokenizer starts every text with one). Tokens are never added:
a new token would index past the model's embedding matrix and the saved tokenizer would no longer
match the model. The characters of each assistant turn, from the end of the generation prompt to
its end-of-turn token, are found by rendering the conversation up to that turn, and every token
that starts inside one of those spans gets a label; every other token gets -100 (no loss).
Whitespace the template writes after the end-of-turn token is not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .records import Record

IGNORE = -100
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# For a model with no template and no ChatML tokens: only tokens it already has. Renders as
#   "### System:\n{content}\n\n### User:\n{content}\n\n### Assistant:\n{content}{eos}\n\n"
# and the generation prompt is "### Assistant:\n"; generation stops at the eos token.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
TRAIN_ON = ("completion", "all")


@dataclass
class Example:
    """Token ids, labels (-100 where there is no loss) and where the example came from."""

    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


def _single_token(tokenizer, token: str) -> bool:
    """Whether `token` is in the vocabulary and the tokenizer encodes its text as that one id."""
    vocab = tokenizer.get_vocab()
    return token in vocab and tokenizer(token, add_special_tokens=False)["input_ids"] == [vocab[token]]


def ensure_chat_template(tokenizer, source: str | None = None) -> None:
    """Give a tokenizer without a chat template `fallback_chat_template`'s; never adds tokens."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = fallback_chat_template(tokenizer, source)


def fallback_chat_template(tokenizer, source: str | None = None) -> str:
    """The template qlorafit uses for a tokenizer that has none: ChatML or DEFAULT_TEMPLATE.

    ChatML when its two tokens are already single tokens of the vocabulary, else DEFAULT_TEMPLATE,
    which needs an eos token to end assistant turns (DataError without one; `source` names the
    record in the message).
    """
    if all(_single_token(tokenizer, t) for t in CHATML_TOKENS):
        return CHATML_TEMPLATE
    if tokenizer.eos_token is not None:
        # a model that starts every text with BOS (add_bos_token) starts a conversation with it too
        starts_with_bos = getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token is not None
        return ("{{ bos_token }}" if starts_with_bos else "") + DEFAULT_TEMPLATE
    where = f"{source}: " if source else ""
    name = getattr(tokenizer, "name_or_path", "")
    raise DataError(
        f"{where}the tokenizer{f' of {name}' if name else ''} has no chat template and no eos token to end assistant turns with, "
        "so conversations cannot be rendered; set a chat template (chat_template in tokenizer_config.json) "
        "or use prompt/completion records"
    )


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], source: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise DataError(
                f"{source}: the chat template renders earlier turns differently once later turns follow, so the "
                "assistant turns cannot be located; use data.train_on: all or a template without that behaviour"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def _tokenize_chat(record: Record, tokenizer, train_on: str) -> tuple[list[int], list[int]]:
    ensure_chat_template(tokenizer, record.source)
    text, spans = assistant_spans(tokenizer, record.messages, record.source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on == "all":
        return ids, list(ids)
    labels = [
        tok if any(start <= begin < end for start, end in spans) else IGNORE
        for tok, (begin, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def _tokenize_plain(record: Record, tokenizer, train_on: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer(record.prompt, add_special_tokens=True)["input_ids"] if record.prompt else []
    if not prompt and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id]
    completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    ids = prompt + completion
    if train_on == "all" or record.train_on_prompt:
        return ids, list(ids)
    return ids, [IGNORE] * len(prompt) + completion


def tokenize_record(record: Record, tokenizer, train_on: str = "completion") -> Example:
    """Token ids and labels for one record."""
    if train_on not in TRAIN_ON:
        raise DataError(f"unknown train_on {train_on!r}: use one of {', '.join(TRAIN_ON)}")
    tokenize = _tokenize_chat if record.messages is not None else _tokenize_plain
    ids, labels = tokenize(record, tokenizer, train_on)
    return Example(ids, labels, record.source)


def truncate(example: Example, max_length: int) -> tuple[Example | None, bool]:
    """Keep the first `max_length` tokens; (None, True) when no labelled token is left."""
    if len(example) <= max_length:
        return example, False
    cut = Example(example.input_ids[:max_length], example.labels[:max_length], example.source)
    if all(label == IGNORE for label in cut.labels):
        return None, True
    return cut, True
