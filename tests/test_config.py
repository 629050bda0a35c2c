"""The config schema: defaults, YAML errors with lines and suggestions, --set, and its documentation."""

from pathlib import Path

import pytest

from qlorafit.config import ConfigError, load_config, parse_override, schema_keys

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: t.jsonl\n")
    config = load_config(path, ["train.lr=1e-4", "lora.targets=[q_proj, v_proj]", "output_dir=007", "data.eval=null"])
    assert config.train.lr == 1e-4 and config.lora.targets == ["q_proj", "v_proj"]
    assert config.output_dir == "007" and config.data.eval is None
    assert config.quant.type == "nf4" and config.lora.r == 16 and config.train.schedule == "cosine"


def test_every_problem_is_reported_with_line_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlora:\n  rank: 8\n  r: -1\ndata:\n  trian: a.jsonl\ntrain: {epochs: 2, lrate: 3}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert "5 problem(s)" in message
    for expected in ("c.yaml:3: unknown key 'lora.rank'; did you mean 'lora.r'?", "c.yaml:4: lora.r: Input should be greater than 0",
                     "missing required key 'data.train'", "c.yaml:6: unknown key 'data.trian'; did you mean 'data.train'?",
                     "c.yaml:7: unknown key 'train.lrate'; did you mean 'train.lr'?"):
        assert expected in message


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="unknown key; did you mean 'train.epochs'"):
        parse_override("train.epoch=3")


def test_docs_list_every_key_with_its_default():
    text = DOCS.read_text()
    for key, field in schema_keys().items():
        assert f"`{key}`" in text, f"docs/config.md does not document {key}"
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            assert f"`{key}` | `{shown}`" in text, f"docs/config.md shows another default for {key}"
