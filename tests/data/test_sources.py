"""Data in every common form (through `datasets`), field mappings, weighted mixes, held-out fractions,
and located errors for bad records."""

from __future__ import annotations

import json

import datasets
import pytest

from qlorafit.config import build_config
from qlorafit.data.sources import Source, hold_out, read_records, read_source, read_sources
from qlorafit.errors import DataError
from qlorafit.train.run import run_training

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(6)]


def _same(records) -> list[tuple[str, str]]:
    return [(r.prompt, r.completion) for r in records]


def _write_every_form(tmp_path, rows: list[dict]) -> dict[str, str]:
    table = datasets.Dataset.from_list(rows)
    paths = {"jsonl": tmp_path / "d.jsonl", "json-array": tmp_path / "array.json", "json-lines": tmp_path / "lines.json",
             "parquet": tmp_path / "d.parquet", "csv": tmp_path / "d.csv", "tsv": tmp_path / "d.tsv"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json-array"].write_text(json.dumps(rows))
    paths["json-lines"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    table.to_parquet(str(paths["parquet"]))
    table.to_csv(str(paths["csv"]), index=False)
    table.to_pandas().to_csv(paths["tsv"], sep="\t", index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved-dict"))
    paths["saved"], paths["saved-dict"] = tmp_path / "saved", tmp_path / "saved-dict"
    paths["arrow"] = next((tmp_path / "saved").glob("*.arrow"))
    return {k: str(v) for k, v in paths.items()}


def test_every_form_reads_the_same_records(tmp_path):
    paths = _write_every_form(tmp_path, ROWS)
    for name, path in paths.items():
        assert _same(read_records(path)) == _same(read_records(paths["jsonl"])) == [
            (r["prompt"], r["completion"]) for r in ROWS], name
    assert _same(read_source(Source(paths["saved-dict"], split="test"))) == [("question 0", "answer 0")]
    with pytest.raises(DataError, match="has no split 'dev'; the splits are train, test"):
        read_source(Source(paths["saved-dict"], split="dev"))
    # rows are named in errors: the row of a table, the line of a JSONL file
    assert read_records(paths["parquet"])[2].source == f"{paths['parquet']}: row 3"
    assert read_records(paths["jsonl"])[2].source == f"{paths['jsonl']}:3"


def test_fields_map_column_names_for_plain_and_chat_records(tmp_path):
    table = datasets.Dataset.from_list([{"question": "q", "answer": "a", "id": 1}])
    table.to_parquet(str(tmp_path / "qa.parquet"))
    records = read_source(Source(str(tmp_path / "qa.parquet"), fields={"prompt": "question", "completion": "answer"}))
    assert _same(records) == [("q", "a")]
    chats = [{"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "hello"}]}]
    (tmp_path / "chats.json").write_text(json.dumps(chats))
    records = read_source(Source(str(tmp_path / "chats.json"), format="messages",
                                 fields={"messages": "dialog", "role": "speaker", "content": "text"}))
    assert records[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"qa\.parquet: row 1: has no field 'query' \(fields: prompt -> query\)"):
        read_source(Source(str(tmp_path / "qa.parquet"), fields={"prompt": "query", "completion": "answer"}))
    # two names from one column, and a column named like one of ours
    table = datasets.Dataset.from_list([{"q": "both", "prompt": "the answer"}])
    table.to_parquet(str(tmp_path / "crossed.parquet"))
    records = read_source(Source(str(tmp_path / "crossed.parquet"), fields={"prompt": "q", "completion": "prompt"}))
    assert _same(records) == [("both", "the answer")]
    with pytest.raises(DataError, match="fields maps unknown name"):
        read_source(Source(str(tmp_path / "qa.parquet"), fields={"question": "prompt"}))


def test_bad_records_are_located_by_row_and_field(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[3]["completion"] = "   "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet: row 4: 'completion' is empty"):
        read_records(tmp_path / "bad.parquet")
    (tmp_path / "bad.csv").write_text("prompt,completion\nq,a\nq2\n")
    with pytest.raises(DataError, match=r"bad\.csv"):
        read_records(tmp_path / "bad.csv")
    (tmp_path / "broken.json").write_text('[{"prompt": "q", "completion": ')
    with pytest.raises(DataError, match=r"broken\.json: cannot be read as \.json data"):
        read_records(tmp_path / "broken.json")


def test_hub_names_are_refused_offline_and_missing_paths_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="someone/some-data: not a local file or folder, and hub datasets cannot be read "
                                        "offline"):
        read_source(Source("someone/some-data"))
    with pytest.raises(DataError, match=r"missing\.parquet: no such file"):
        read_source(Source(str(tmp_path / "missing.parquet")))


def test_weights_mix_sources_deterministically(tmp_path):
    paths = _write_every_form(tmp_path, ROWS)
    sources = [Source(paths["jsonl"], weight=2), Source(paths["parquet"], weight=0.5)]
    mixed, held = read_sources(sources, seed=3)
    assert len(mixed) == 12 + 3 and held == []
    assert _same(mixed[:12]) == _same(read_records(paths["jsonl"])) * 2
    again, _ = read_sources(sources, seed=3)
    other, _ = read_sources(sources, seed=4)
    assert _same(again) == _same(mixed) and _same(other[12:]) != _same(mixed[12:])
    train, held = hold_out(mixed, 0.2, seed=0)
    assert len(held) == 3 and len(train) == 12 and _same(hold_out(mixed, 0.2, seed=0)[1]) == _same(held)
    # held out before weighting: a record repeated for training is never also an eval record
    train, held = read_sources(sources, seed=3, eval_fraction=0.25)
    assert len(held) == 3 and not {id(r) for r in held} & {id(r) for r in train}
    from_jsonl = sum(r.source.startswith(paths["jsonl"]) for r in held)
    assert len(train) == 2 * (6 - from_jsonl) + round(0.5 * (6 - (3 - from_jsonl)))  # the rest of each, weighted
    with pytest.raises(DataError, match="weight 0.05 of 6 records gives none"):
        read_sources([Source(paths["jsonl"], weight=0.05)])


def test_a_run_trains_on_a_weighted_mix_with_a_held_out_fraction(tiny_chat_model_dir, tmp_path):
    chats = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}
             for w in ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "star")]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    qa = datasets.Dataset.from_list([{"q": f"say {w}", "a": w} for w in ("red", "blue", "green", "gold")])
    qa.to_parquet(str(tmp_path / "qa.parquet"))
    tree = {"model": str(tiny_chat_model_dir), "lora": {"r": 4, "alpha": 8},
            "data": {"train": [{"path": str(tmp_path / "chats.jsonl")},
                               {"path": str(tmp_path / "qa.parquet"), "fields": {"prompt": "q", "completion": "a"},
                                "weight": 0.5}],
                     "eval_fraction": 0.2, "max_length": 64},
            "train": {"batch_size": 2, "max_steps": 2}, "output_dir": str(tmp_path / "run")}
    summary = run_training(build_config(tree))
    assert summary["train_examples"] == 10 - 2  # 8 chats + 2 of the 4 rows, 2 held out
    assert summary["eval_tokens"] > 0
    # a bad record anywhere in the mix: a located error, and nothing written
    datasets.Dataset.from_list([{"q": "x", "a": None}]).to_parquet(str(tmp_path / "qa.parquet"))
    tree["output_dir"] = str(tmp_path / "other")
    with pytest.raises(DataError, match=r"qa\.parquet: row 1: record with keys prompt is not in one of the formats"):
        run_training(build_config(tree))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("form", ["jsonl", "json-array", "json-lines", "parquet", "csv", "tsv", "arrow", "saved"])
def test_a_bad_record_in_any_form_is_located(tmp_path, form):
    rows = [dict(r) for r in ROWS]
    rows[2]["completion"] = "  "  # the third record
    path = _write_every_form(tmp_path, rows)[form]
    where = {"jsonl": ":3", "json-lines": ": record 3", "json-array": ": record 3"}.get(form, ": row 3")
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert str(exc.value).startswith(f"{path}{where}: 'completion' is empty"), str(exc.value)


def test_csv_cells_stay_text_as_written(tmp_path):
    (tmp_path / "t.csv").write_text('prompt,completion\nwhat is 6*7,42\nsay null,NA\n0,"007"\n')
    assert _same(read_records(tmp_path / "t.csv")) == [("what is 6*7", "42"), ("say null", "NA"), ("0", "007")]
