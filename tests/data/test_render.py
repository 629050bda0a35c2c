"""Loss masks: assistant turns and their end-of-turn token are trained on, nothing else."""

import json

import pytest

from qlorafit.data.dataset import load_dataset
from qlorafit.data.records import Record
from qlorafit.data.render import CHATML_TEMPLATE, IGNORE, tokenize_record, truncate
from qlorafit.errors import DataError
from tests.conftest import byte_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def _trained_text(tok, example):
    return tok.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


def test_multi_turn_mask_covers_each_assistant_turn_and_its_end_token(tokenizer):
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tokenizer)
    assert _trained_text(tokenizer, example) == "Hello there<|im_end|>4<|im_end|>"
    # Labels equal the ids where trained (the model shifts them itself).
    assert all(label in (IGNORE, t) for t, label in zip(example.input_ids, example.labels, strict=True))
    full = tokenizer.decode(example.input_ids)
    assert full == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.real_model
def test_multi_turn_mask_with_the_smollm2_template(smollm2_path):
    from qlorafit.models.gguf import gguf_tokenizer

    tok = gguf_tokenizer(smollm2_path)
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    assert _trained_text(tok, example) == "Hello there<|im_end|>4<|im_end|>"


def test_train_on_all_and_plain_text(tokenizer):
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tokenizer, train_on="all")
    assert example.labels == example.input_ids
    plain = tokenize_record(Record("x:1", prompt="Q: ", completion="A"), tokenizer)
    assert _trained_text(tokenizer, plain) == "A<|im_end|>"
    text = tokenize_record(Record("x:1", completion="all of it", train_on_prompt=True), tokenizer)
    assert _trained_text(tokenizer, text) == "all of it<|im_end|>"


def test_truncation_keeps_the_start_and_drops_records_with_nothing_left(tokenizer):
    example = tokenize_record(Record("x:1", messages=CONVERSATION), tokenizer)
    cut, was_cut = truncate(example, len(example) - 3)
    assert was_cut and cut.input_ids == example.input_ids[: len(example) - 3]
    gone, was_cut = truncate(example, 10)  # only the system prompt fits
    assert gone is None and was_cut
    same, was_cut = truncate(example, len(example))
    assert same is example and not was_cut


def test_load_dataset_counts_truncation_and_uses_chatml_fallback(tmp_path):
    tok = byte_tokenizer(chat_template=False)
    size = len(tok)
    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * n}]} for n in (3, 400)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    data = load_dataset(path, tok, max_length=64)
    assert tok.chat_template == CHATML_TEMPLATE and len(tok) == size  # its ChatML tokens were already there
    assert len(data.examples) == 2 and data.truncated == 1 and data.dropped == []
    assert max(data.lengths) == 64
    with pytest.raises(DataError, match="no usable records"):
        load_dataset(path, tok, max_length=8)
    with pytest.raises(DataError, match="unknown train_on 'prompts'"):
        load_dataset(path, tok, train_on="prompts")
