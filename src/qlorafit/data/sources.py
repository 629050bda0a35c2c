"""Data sources in every common form, read through Hugging Face `datasets`, into Records.

A source is a path (or, online, a hub dataset name) with an optional `format`, a `fields`
mapping from the names qlorafit expects to the source's own column names, a `split` and a
sampling `weight`:

  .jsonl                     qlorafit's own line reader (errors name the line)
  .json                      an array of records, or one record per line
  .parquet, .csv, .tsv       one record per row (errors name the row)
  .arrow                     an Arrow file written by `datasets`
  a folder                   `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (split: train by default)
  a hub name (user/name)     `datasets.load_dataset(name, split=...)`, only when online

Several sources are mixed by weight: a source of n records with weight w contributes round(w n)
of them (w < 1: a seeded sample, w > 1: repeated), so a mix is the same for the same seed.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .records import FORMATS, Record, detect_format, has_format_keys, read_jsonl_rows, to_record

_DATASETS_FILES = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_ROW_KIND = {".json": "record", ".parquet": "row", ".csv": "row", ".tsv": "row", ".arrow": "row"}
# the names a `fields` mapping may give: top-level record keys, and the keys inside chat turns
RECORD_FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text")
TURN_FIELDS = ("role", "content", "from", "value")


@dataclass
class Source:
    """One data source: where, in which format, under which column names, which split, how much."""

    path: str
    format: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    weight: float = 1.0


def _hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not Path(path).exists() and not path.startswith((".", "/", "~"))


def _table_rows(source: Source) -> tuple[list[dict], str]:
    """The rows of a non-JSONL source, and what one of its rows is called in errors."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{source.path}: reading this form of data needs the `datasets` package (pip install "
                        "datasets)") from exc
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="qlorafit-data-") as cache:
            if path.is_dir():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    split = source.split or "train"
                    if split not in loaded:
                        raise DataError(f"{path}: has no split {split!r}; the splits are {', '.join(loaded)} "
                                        "(set the source's split)")
                    loaded = loaded[split]
                return loaded.to_list(), "row"
            if suffix == ".arrow":
                return datasets.Dataset.from_file(str(path), in_memory=True).to_list(), "row"
            if suffix in _DATASETS_FILES:
                kwargs = _csv_as_text(path, "\t" if suffix == ".tsv" else ",") if suffix in (".csv", ".tsv") else {}
                loaded = datasets.load_dataset(_DATASETS_FILES[suffix], data_files=str(path), split="train",
                                               cache_dir=cache, keep_in_memory=True, **kwargs)
                return loaded.to_list(), _ROW_KIND[suffix]
            if _hub_name(source.path):
                if datasets.config.HF_HUB_OFFLINE:
                    raise DataError(f"{source.path}: not a local file or folder, and hub datasets cannot be read "
                                    "offline (HF_HUB_OFFLINE is set); download it, or give a local path")
                loaded = datasets.load_dataset(source.path, split=source.split or "train", cache_dir=None)
                return loaded.to_list(), "row"
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{source.path}: no such file or folder ({exc})") from exc
    except Exception as exc:  # pyarrow, csv and hub errors: say which source, and what was wrong
        if _hub_name(source.path):
            raise DataError(f"{source.path}: not a local file, and reading it from the hub failed ({exc}); "
                            "without network access give a local path") from exc
        raise DataError(f"{source.path}: cannot be read as {suffix or 'a dataset folder'} data ({exc})") from exc
    raise DataError(f"{source.path}: no such file or folder; give a .jsonl, .json, .parquet, .csv, .tsv or .arrow "
                    "file, a datasets folder, or a hub name (user/name) when online")


def _csv_as_text(path: Path, delimiter: str) -> dict:
    """read_csv settings that keep every cell as written: text columns ("42" stays a string) and
    no NA guessing ("NA", "null" stay words)."""
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    return {"delimiter": delimiter, "keep_default_na": False, "na_filter": False,
            "features": datasets.Features({name: datasets.Value("string") for name in header})}


def _rename(row: dict, fields: dict[str, str], where: str) -> dict:
    """The row with the source's column names replaced by the names qlorafit expects."""
    plain = {ours: theirs for ours, theirs in fields.items() if ours not in TURN_FIELDS}
    for ours, theirs in plain.items():
        if theirs not in row:
            raise DataError(f"{where}: has no field {theirs!r} (fields: {ours} -> {theirs}); its fields are "
                            f"{', '.join(map(str, row)) or '(none)'}")
    out = {k: v for k, v in row.items() if k not in set(plain.values())}
    out.update({ours: row[theirs] for ours, theirs in plain.items()})
    turn_map = {theirs: ours for ours, theirs in fields.items() if ours in TURN_FIELDS}
    if turn_map:
        for key in ("messages", "conversations"):
            if isinstance(out.get(key), list):
                out[key] = [{turn_map.get(k, k): v for k, v in turn.items()} if isinstance(turn, dict) else turn
                            for turn in out[key]]
    return out


def _check_fields(source: Source) -> None:
    unknown = [k for k in source.fields if k not in RECORD_FIELDS + TURN_FIELDS]
    if unknown:
        raise DataError(f"{source.path}: fields maps unknown name(s) {', '.join(unknown)}; map any of "
                        f"{', '.join(RECORD_FIELDS + TURN_FIELDS)} to your column names")
    if source.format != "auto" and source.format not in FORMATS:
        raise DataError(f"{source.path}: unknown format {source.format!r}: use auto or one of {', '.join(FORMATS)}")


def read_source(source: Source) -> list[Record]:
    """Every record of one source as a Record; a bad record raises DataError naming file and line/row."""
    _check_fields(source)
    path = Path(source.path).expanduser()
    if path.suffix.lower() == ".jsonl" or (path.is_file() and path.suffix.lower() not in _DATASETS_FILES
                                           and path.suffix.lower() != ".arrow"):
        rows = read_jsonl_rows(path)
    else:
        table, kind = _table_rows(source)
        rows = [(f"{source.path}: {kind} {i + 1}", row) for i, row in enumerate(table)]
    fmt, records = source.format, []
    for where, raw in rows:
        raw = _rename(raw, source.fields, where) if source.fields else raw
        raw = {k: v for k, v in raw.items() if v is not None}  # a table's empty cells
        found = detect_format(raw)
        if fmt == "auto":
            fmt = found or fmt
        if found is None or (found != fmt and not has_format_keys(raw, fmt)):
            keys = ", ".join(sorted(map(str, raw))) or "(none)"
            expected = f"format {fmt!r}" if fmt != "auto" else f"one of the formats {', '.join(FORMATS)}"
            raise DataError(f"{where}: record with keys {keys} is not in {expected}; see docs/data.md, or map your "
                            "column names with the source's fields")
        records.append(to_record(raw, fmt, where))
    if not records:
        raise DataError(f"{source.path}: no records; the file is empty")
    return records


def read_records(path: str | Path, fmt: str = "auto") -> list[Record]:
    """Every record of a data file (JSONL, JSON, Parquet, CSV/TSV, Arrow, a datasets folder) as a
    Record; any bad record raises DataError with its line or row."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
    return read_source(Source(str(path), fmt))


def weighted(records: list[Record], weight: float, seed: int) -> list[Record]:
    """round(weight x n) of the records: all of them repeated floor(weight) times, plus a seeded
    sample for the fraction."""
    if weight <= 0:
        raise DataError(f"a source weight must be positive, got {weight}")
    whole, fraction = int(weight), weight - int(weight)
    extra = round(fraction * len(records))
    if records and whole == 0 and extra == 0:
        raise DataError(f"{records[0].source.rsplit(':', 1)[0]}: weight {weight} of {len(records)} records gives none; "
                        "raise the weight or remove the source")
    sample = random.Random(seed).sample(records, extra) if extra else []
    return records * whole + sample


def read_sources(sources: list[Source], seed: int = 0, eval_fraction: float = 0.0
                 ) -> tuple[list[Record], list[Record]]:
    """(the records of every source, each weighted, in source order; the held-out records).

    With `eval_fraction` a seeded share of the records, before weighting, is held out: a record
    repeated by a weight above 1 is never both trained and evaluated on.
    """
    per_source = [read_source(source) for source in sources]
    held: list[Record] = []
    if eval_fraction:
        tagged = [(i, r) for i, records in enumerate(per_source) for r in records]
        kept, held_tagged = hold_out(tagged, eval_fraction, seed)
        per_source = [[r for i, r in kept if i == k] for k in range(len(sources))]
        held = [r for _, r in held_tagged]
    out: list[Record] = []
    for i, (source, records) in enumerate(zip(sources, per_source, strict=True)):
        if records:
            out += weighted(records, source.weight, seed * 1_000_003 + i)
    return out, held


def _source(item, fmt: str) -> Source:
    """A Source from a config entry: a path string, or a SourceConfig-like object."""
    if isinstance(item, (str, Path)):
        return Source(str(item), fmt)
    return Source(item.path, item.format if item.format != "auto" else fmt, dict(item.fields), item.split, item.weight)


def read_data(data, seed: int) -> tuple[list[Record], list[Record] | None, str, str | None]:
    """(train records, eval records or None, and names for them) as a DataConfig describes: one
    source or a weighted list, and a data.eval source or a seeded data.eval_fraction held out."""
    sources = [_source(s, data.format) for s in (data.train if isinstance(data.train, list) else [data.train])]
    if data.eval is not None and data.eval_fraction:
        raise DataError("data.eval and data.eval_fraction both given: use one way of choosing the eval records")
    train, held = read_sources(sources, seed, data.eval_fraction)
    train_name = sources[0].path if len(sources) == 1 else f"{len(sources)} sources"
    if data.eval_fraction:
        return train, held, train_name, f"{data.eval_fraction:g} of {train_name}"
    if data.eval is None:
        return train, None, train_name, None
    source = _source(data.eval, data.format)
    return train, read_source(source), train_name, source.path


def hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded `fraction` of the records held out for evaluation (at least one)."""
    if not 0 < fraction < 1:
        raise DataError(f"data.eval_fraction must be between 0 and 1, got {fraction}")
    n_eval = max(1, math.ceil(fraction * len(records)))
    if n_eval >= len(records):
        raise DataError(f"data.eval_fraction {fraction} of {len(records)} records leaves nothing to train on")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
