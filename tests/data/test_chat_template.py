"""The chat-template fallback: ChatML only when the model has its tokens, else the default; never new tokens."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qlorafit.data.records import Record
from qlorafit.data.render import (
    CHATML_TEMPLATE,
    DEFAULT_TEMPLATE,
    IGNORE,
    ensure_chat_template,
    tokenize_record,
)
from qlorafit.errors import DataError
from qlorafit.generate import encode_prompt, generate_text, stop_token_ids
from tests.conftest import byte_tokenizer
from tests.data.test_render import CONVERSATION, _trained_text


def base_tokenizer(eos: str | None = "</s>", extra: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer like a base model's: no chat template, `eos` and `extra` in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    for token in ((eos,) if eos else ()) + extra:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    assert tok.chat_template is None
    return tok


@pytest.mark.parametrize("extra", [(), ("<|im_end|>",)], ids=["plain", "only-im_end"])
def test_without_chatml_tokens_the_default_template_uses_only_existing_tokens(extra):
    tok = base_tokenizer(extra=extra)
    size = len(tok)
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    assert tok.chat_template == DEFAULT_TEMPLATE
    assert len(tok) == size and max(example.input_ids) < size
    assert tok.decode(example.input_ids) == (
        "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello there</s>\n\n"
        "### User:\n2+2?\n\n### Assistant:\n4</s>\n\n"
    )
    assert _trained_text(tok, example) == "Hello there</s>4</s>"
    trained_ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    assert trained_ids.count(tok.eos_token_id) == 2


def test_with_chatml_tokens_but_no_template_chatml_is_used_and_nothing_is_added():
    tok = byte_tokenizer(chat_template=False)
    size = len(tok)
    ensure_chat_template(tok)
    assert tok.chat_template == CHATML_TEMPLATE and len(tok) == size
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    assert _trained_text(tok, example) == "Hello there<|im_end|>4<|im_end|>"


def test_an_existing_template_is_kept():
    tok = base_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ensure_chat_template(tok)
    assert tok.chat_template.startswith("{% for m in messages %}")


def test_no_template_and_no_eos_is_refused_for_chats_but_plain_records_still_work():
    tok = base_tokenizer(eos=None)
    size = len(tok)
    with pytest.raises(DataError, match=r"x:1: .*no chat template and no eos token.*prompt/completion records"):
        tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    assert tok.chat_template is None and len(tok) == size
    plain = tokenize_record(Record("x:2", prompt="Q: ", completion="A"), tok)
    assert tok.decode(plain.input_ids) == "Q: A" and _trained_text(tok, plain) == "A"
    text = tokenize_record(Record("x:3", completion="all of it", train_on_prompt=True), tok)
    assert text.labels == text.input_ids and tok.decode(text.input_ids) == "all of it"


def test_plain_records_are_unaffected_by_the_fallback():
    tok = base_tokenizer()
    before = tokenize_record(Record("x:1", prompt="Q: ", completion="A"), tok)
    assert tok.chat_template is None  # plain records do not need a template
    tokenize_record(Record("x:2", messages=CONVERSATION), tok)
    after = tokenize_record(Record("x:1", prompt="Q: ", completion="A"), tok)
    assert after == before and _trained_text(tok, after) == "A</s>"


class Scripted(nn.Module):
    """A stand-in model that writes the given token ids one after another, whatever it is fed."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        step = past_key_values or 0
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[step]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step + 1)


def test_generation_with_the_default_template_prompts_the_assistant_and_stops_at_eos():
    tok = base_tokenizer()
    prompt = CONVERSATION[:2]
    ids = encode_prompt(tok, prompt)
    assert tok.decode(ids) == "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n"
    assert stop_token_ids(tok) == [tok.eos_token_id]
    script = tok("Hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + tok("###")["input_ids"]
    assert generate_text(Scripted(script, len(tok)), tok, prompt, max_new_tokens=20) == "Hello"


def test_default_template_starts_with_bos_where_the_model_expects_one():
    from transformers import PreTrainedTokenizerFast

    tok = base_tokenizer(extra=("<s>",))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>", bos_token="<s>", add_bos_token=True)
    assert tok.add_bos_token and tok("hi")["input_ids"][0] == tok.bos_token_id
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    assert tok.chat_template == "{{ bos_token }}" + DEFAULT_TEMPLATE
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids.count(tok.bos_token_id) == 1
    assert example.labels[0] == IGNORE
