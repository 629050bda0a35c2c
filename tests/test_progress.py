"""Progress of long steps: log lines when stderr is not a terminal, nothing with --quiet or from the library."""

import re

import qlorafit
from qlorafit import progress
from qlorafit.cli import main
from tests.export.test_gguf_export import _folder
from tests.test_cli import _yaml_config


def test_tasks_are_silent_unless_reporting_and_write_a_line_per_step_of_percent(capsys):
    with progress.task("counting", 50, "thing") as bar:
        for _ in range(50):
            bar.update()
    assert capsys.readouterr().err == ""  # the library alone shows nothing
    with progress.reporting(), progress.task("counting", 50, "thing") as bar:
        for _ in range(50):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert [int(re.search(r"\((\d+)%", line).group(1)) for line in lines[:-1]] == list(range(10, 100, 10))
    assert lines[0].startswith("counting: 5/50 things (10%") and "s left)" in lines[0]
    assert re.fullmatch(r"counting: 50/50 things in \d+\.\d s", lines[-1])


def test_the_command_line_reports_loading_tokenizing_training_and_eval_in_a_log(tiny_chat_model_dir, tmp_path, capsys):
    config = _yaml_config(tmp_path, tiny_chat_model_dir)
    assert main(["train", str(config), "--set", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    for start in (f"loading {tiny_chat_model_dir}: ", "tokenizing train.jsonl: 16/16 records",
                  "tokenizing eval.jsonl: 4/4 records", "step 1/3: loss ", "step 3/3: loss ", "eval loss: 1/1 batches in "):
        assert start in err, (start, err)
    assert main(["-q", "train", str(config), "--set", "train.max_steps=3", "--overwrite"]) == 0
    assert capsys.readouterr().err == ""
    model, tokenizer = qlorafit.load_model(tiny_chat_model_dir)
    qlorafit.add_lora(model, r=2)
    qlorafit.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", str(tiny_chat_model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "merging into merged: " in capsys.readouterr().err
    exportable = _folder("llama", tmp_path / "hf")
    assert main(["export", "--model", str(exportable), "--out", str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    assert "exporting m.gguf (f32): " in capsys.readouterr().err
