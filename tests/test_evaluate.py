from __future__ import annotations

import json
import math

import pytest
import torch

import qlorafit
from qlorafit.data.records import Record
from qlorafit.data.render import IGNORE, Example
from qlorafit.errors import DataError
from qlorafit.evaluate import eval_loss, exact_match, write_predictions
from qlorafit.generate import generate_text, prompt_messages, stream_text
from tests.conftest import build_tiny, byte_tokenizer
from tests.test_generate import byte_model, lively


def example(length: int, masked: int, seed: int) -> Example:
    """Random ids of `length` tokens whose first `masked` labels are -100."""
    ids = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Example(ids, [IGNORE] * masked + ids[masked:], f"x:{seed}")


def hf_loss(model, e: Example) -> tuple[float, int]:
    """transformers' own loss of one example (mean over its labelled tokens), and their count."""
    with torch.no_grad():
        loss = model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
    return float(loss), sum(label != IGNORE for label in e.labels[1:])


def test_eval_loss_of_one_example_equals_the_transformers_loss():
    model = build_tiny("llama")
    e = example(12, 4, seed=0)
    expected, count = hf_loss(model, e)
    result = eval_loss(model, [e])
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == count == 8
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_eval_loss_weights_every_token_the_same(batch_size):
    model = lively(build_tiny("qwen2"), scale=3)
    examples = [example(4, 1, 1), example(17, 2, 2), example(9, 6, 3), example(25, 0, 4), example(6, 3, 5)]
    per_example = [hf_loss(model, e) for e in examples]
    tokens = sum(n for _, n in per_example)
    token_weighted = sum(loss * n for loss, n in per_example) / tokens
    example_mean = sum(loss for loss, _ in per_example) / len(per_example)
    assert abs(token_weighted - example_mean) > 1e-2  # the two weightings differ on this data
    result = eval_loss(model, examples, batch_size=batch_size, pad_id=7)  # padding is masked out
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(token_weighted, rel=1e-5)


def test_eval_loss_restores_training_flags_and_tracks_no_gradients():
    model = qlorafit.add_lora(build_tiny("llama"), r=4, dropout=0.5)
    model.train()
    e = example(10, 2, seed=9)
    first = eval_loss(model, [e])["loss"]
    assert eval_loss(model, [e])["loss"] == first  # no dropout
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_eval_loss_rejects_nothing_to_score():
    model = build_tiny("llama")
    with pytest.raises(DataError, match="no labelled token"):
        eval_loss(model, [Example([1, 2, 3], [IGNORE, IGNORE, IGNORE], "x:1")])
    with pytest.raises(DataError, match="no labelled token"):
        eval_loss(model, [])


def records() -> list[Record]:
    return [
        Record("d:1", messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "?"}]),
        Record("d:2", messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "abc"},
                                {"role": "assistant", "content": "?"}]),
        Record("d:3", prompt="The cat", completion="?"),
        Record("d:4", prompt="1 2 3", completion="?"),
    ]


def test_exact_match_accuracy_on_constructed_references():
    tok, model = byte_tokenizer(), byte_model()
    data = records()
    outputs = [generate_text(model, tok, prompt_messages(r), max_new_tokens=12)
               for r in data]
    assert len(set(outputs)) > 1
    for i, (record, output) in enumerate(zip(data, outputs, strict=True)):
        answer = f"  {output}\n" if i % 2 == 0 else output + "x"  # right (up to whitespace), or wrong
        if record.messages:
            record.messages[-1]["content"] = answer
        else:
            record.completion = answer
    seen = []
    accuracy, predictions = exact_match(model, tok, data, max_new_tokens=12, on_prediction=seen.append)
    assert accuracy == 0.5
    assert [p["correct"] for p in predictions] == [True, False, True, False]
    assert [p["prediction"] for p in predictions] == outputs
    assert [p["source"] for p in predictions] == ["d:1", "d:2", "d:3", "d:4"]
    assert predictions[0]["prompt"] == [{"role": "user", "content": "Hello"}] and predictions[2]["prompt"] == "The cat"
    assert seen == predictions


def test_exact_match_reports_progress_and_keeps_the_records_order():
    tok, model = byte_tokenizer(), byte_model()
    data = records() + [Record("d:5", prompt="a much longer prompt than the others, to sort first", completion="?")]
    alone = [generate_text(model, tok, prompt_messages(r), max_new_tokens=6) for r in data]
    calls, seen = [], []
    _, predictions = exact_match(model, tok, data, max_new_tokens=6, batch_size=2, on_prediction=seen.append,
                                 on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert [p["source"] for p in predictions] == ["d:1", "d:2", "d:3", "d:4", "d:5"]
    assert [p["prediction"] for p in predictions] == alone and seen == predictions


def test_exact_match_needs_records_with_prompts():
    tok, model = byte_tokenizer(), byte_model()
    with pytest.raises(DataError, match="at least one record"):
        exact_match(model, tok, [])
    with pytest.raises(DataError, match="t:1"):
        exact_match(model, tok, [Record("t:1", completion="text only", train_on_prompt=True)])


def test_write_predictions_is_jsonl_and_atomic(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    rows = [{"source": "d:1", "prompt": [{"role": "user", "content": "é?"}], "prediction": "€", "reference": "€",
             "correct": True}, {"source": "d:2", "prompt": "p", "prediction": "", "reference": "x", "correct": False}]
    write_predictions(path, rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert "€" in path.read_text(encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_predictions(path, [{"ok": 1}, {"bad": object()}])
    assert path.read_bytes() == before  # a failed write leaves the old file whole
    assert [p.name for p in path.parent.iterdir()] == ["predictions.jsonl"]
    write_predictions(path, rows[:1])
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1


@pytest.mark.real_model
def test_smollm2_exact_match(smollm2_path):
    model, tok = qlorafit.load_model("smollm2-135m-instruct", quant="nf4")
    data = [
        Record("r:1", messages=[{"role": "user", "content": "What is the capital of France? Answer with one word."},
                                {"role": "assistant", "content": "Paris"}]),
        Record("r:2", messages=[{"role": "user", "content": "What is 2 + 2? Answer with a number."},
                                {"role": "assistant", "content": "4"}]),
    ]
    accuracy, predictions = exact_match(model, tok, data, max_new_tokens=8)
    assert all(p["prediction"].strip() for p in predictions)
    assert "Paris" in predictions[0]["prediction"]
    assert accuracy == sum(p["correct"] for p in predictions) / 2
    # The real byte-level BPE tokenizer streams multi-byte characters whole.
    ids = tok(predictions[0]["prediction"] + " — café 🙂", add_special_tokens=False)["input_ids"]
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)
