"""A JSONL file made ready to train on: tokenized examples and what happened on the way."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..progress import task
from .records import Record
from .render import Example, tokenize_record, truncate
from .sources import read_records

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Tokenized examples of one file, and counts of truncated and dropped records."""

    path: Path
    examples: list[Example]
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]

    def label_tokens(self) -> int:
        return sum(sum(label != -100 for label in e.labels) for e in self.examples)


def load_dataset(path: str | Path | list[Record], tokenizer, fmt: str = "auto", max_length: int = 512,
                 train_on: str = "completion", name: str | None = None) -> Dataset:
    """Read (any form `read_records` takes, or records already read), render, tokenize and truncate.

    Truncation keeps the first `max_length` tokens of a record; a record left with no labelled
    token is dropped, and both counts are logged and kept on the Dataset.
    """
    if max_length < 2:
        raise DataError(f"data.max_length must be at least 2, got {max_length}")
    records = list(path) if isinstance(path, list) else read_records(path, fmt)
    label = name or (str(path) if not isinstance(path, list) else "records")
    data = Dataset(Path(label), [])
    with task(f"tokenizing {Path(label).name}", len(records), "record") as bar:
        for record in records:
            example, was_cut = truncate(tokenize_record(record, tokenizer, train_on), max_length)
            data.truncated += was_cut
            if example is None:
                data.dropped.append(record.source)
            elif all(x == -100 for x in example.labels):
                raise DataError(f"{record.source}: the record has no token to train on")
            else:
                data.examples.append(example)
            bar.update()
    if data.truncated:
        logger.warning("%s: %d records longer than %d tokens were truncated (%d dropped: nothing left to learn)",
                       label, data.truncated, max_length, len(data.dropped))
    if not data.examples:
        raise DataError(f"{label}: no usable records (all {len(data.dropped)} were cut away by max_length={max_length})")
    return data
