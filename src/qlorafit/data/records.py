"""Training records: reading JSONL lines and bringing every known format to one shape.

Formats, detected per file from its first record (or forced with `format=`):

  messages    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
  sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
  alpaca      {"instruction": "...", "input": "..." (optional), "output": "..."}
  completion  {"prompt": "...", "completion": "..."}
  text        {"text": "..."}

The first three become chat conversations (rendered with the tokenizer's chat template);
`completion` is a prompt and a continuation of plain text; `text` is plain text, all trained on.
Every problem is reported with the file and line number, and none is skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

_FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                "completion": ("prompt", "completion"), "text": ("text",)}
FORMATS = tuple(_FORMAT_KEYS)  # also the order of precedence when a record has the keys of several
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Record:
    """One training example: chat `messages`, or a plain-text `prompt` + `completion`."""

    source: str  # "file:line", for messages that point at the record
    messages: list[dict[str, str]] | None = None
    prompt: str = ""
    completion: str = ""
    train_on_prompt: bool = False  # plain text records train on every token


def detect_format(record: dict) -> str | None:
    """The first format, in FORMATS' order, whose keys the record has; None when it has none's."""
    return next((fmt for fmt in FORMATS if has_format_keys(record, fmt)), None)


def _string(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat(turns, where: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}: turn {i} must be an object with {role_key!r} and {text_key!r}")
        role = roles.get(turn[role_key])
        if role is None:
            raise DataError(f"{where}: turn {i} has role {turn[role_key]!r}; use one of {', '.join(sorted(roles))}")
        content = _string(turn[text_key], where, f"turn {i} {text_key}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: turn {i} is an empty assistant turn; remove the record or fill it in")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return messages


def to_record(raw: dict, fmt: str, where: str) -> Record:
    """Bring one decoded JSON object in format `fmt` to a Record; raises DataError naming `where`."""
    if fmt == "messages":
        return Record(where, messages=_chat(raw["messages"], where, "role", "content", {r: r for r in ROLES}))
    if fmt == "sharegpt":
        return Record(where, messages=_chat(raw["conversations"], where, "from", "value", _SHAREGPT_ROLES))
    if fmt == "alpaca":
        instruction = _string(raw["instruction"], where, "instruction")
        extra = _string(raw.get("input") or "", where, "input")
        output = _string(raw["output"], where, "output")
        if not output.strip():
            raise DataError(f"{where}: 'output' is empty; remove the record or fill it in")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Record(where, messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    if fmt == "completion":
        completion = _string(raw["completion"], where, "completion")
        if not completion.strip():
            raise DataError(f"{where}: 'completion' is empty; remove the record or fill it in")
        return Record(where, prompt=_string(raw["prompt"], where, "prompt"), completion=completion)
    text = _string(raw["text"], where, "text")
    if not text.strip():
        raise DataError(f"{where}: 'text' is empty; remove the record or fill it in")
    return Record(where, completion=text, train_on_prompt=True)


def read_jsonl_rows(path: str | Path) -> list[tuple[str, dict]]:
    """("file:line", object) for every non-blank line of a JSONL file; a bad line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a JSONL file with one record per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8 JSONL") from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        rows.append((where, raw))
    return rows


def has_format_keys(raw: dict, fmt: str) -> bool:
    """Whether `raw` has every key format `fmt` needs."""
    return all(k in raw for k in _FORMAT_KEYS[fmt])
