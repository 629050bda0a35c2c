"""JSONL reading and format detection: every format, and every kind of bad line with its number."""

import json

import pytest

from qlorafit.data.sources import read_records
from qlorafit.errors import DataError


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_every_format_becomes_a_record(tmp_path):
    cases = {
        "messages": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                  {"role": "assistant", "content": "a"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
        "alpaca": {"instruction": "do", "input": "this", "output": "done"},
        "completion": {"prompt": "p", "completion": "c"},
        "text": {"text": "plain"},
    }
    for fmt, raw in cases.items():
        (record,) = read_records(_write(tmp_path, [raw], f"{fmt}.jsonl"))
        assert record.source.endswith(f"{fmt}.jsonl:1")
        if fmt in ("messages", "sharegpt"):
            assert record.messages[-1] == {"role": "assistant", "content": "a"}
        if fmt == "alpaca":
            assert record.messages == [{"role": "user", "content": "do\n\nthis"}, {"role": "assistant", "content": "done"}]
        if fmt == "completion":
            assert (record.prompt, record.completion, record.train_on_prompt) == ("p", "c", False)
        if fmt == "text":
            assert record.completion == "plain" and record.train_on_prompt


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"d.jsonl:2: not valid JSON"),
        ("[1, 2]", r"d.jsonl:2: expected a JSON object, got list"),
        ({"question": "q", "answer": "a"}, r"d.jsonl:2: record with keys answer, question is not in format 'messages'"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "  "}]},
         r"d.jsonl:2: turn 1 is an empty assistant turn"),
        ({"messages": [{"role": "user", "content": "u"}]}, r"d.jsonl:2: the conversation has no assistant turn"),
        ({"messages": [{"role": "robot", "content": "u"}]}, r"d.jsonl:2: turn 0 has role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
         r"d.jsonl:2: 'turn 0 content' must be a string, got int"),
        ({"messages": []}, r"d.jsonl:2: expected a non-empty list of turns"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=message):
        read_records(_write(tmp_path, [good, line]))


def test_missing_empty_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="no records"):
        read_records(_write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        read_records(_write(tmp_path, [{"text": "x"}]), fmt="csv")
    with pytest.raises(DataError, match="is not in format 'alpaca'"):
        read_records(_write(tmp_path, [{"text": "x"}]), fmt="alpaca")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(tmp_path / "bin.jsonl")
