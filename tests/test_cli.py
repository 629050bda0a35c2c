"""The command line: merge end to end on a tiny model, errors as messages."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import qlorafit
from qlorafit.cli import main
from tests.conftest import token_batch


def test_merge_command(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model, _ = qlorafit.load_model(folder, quant="none")
    qlorafit.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    qlorafit.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    x = token_batch()
    with torch.no_grad():
        assert (merged(x).logits - model(x).logits).abs().max() < 1e-4


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["merge", "--model", str(tmp_path / "missing"), "--adapter", "a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "qlorafit: error:" in err and "no such file or folder" in err
    assert not (tmp_path / "o").exists()


def _yaml_config(tmp_path, model_dir):
    from tests.conftest import write_chat_jsonl

    write_chat_jsonl(tmp_path / "train.jsonl", 16)
    write_chat_jsonl(tmp_path / "eval.jsonl", 4, seed=1)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {model_dir}\n"
        "quant: {type: nf4}\n"
        "lora: {r: 4, alpha: 8}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, eval: {tmp_path / 'eval.jsonl'}, max_length: 64}}\n"
        "train: {epochs: 1, batch_size: 4}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    return path


def test_train_eval_generate_commands(tiny_chat_model_dir, tmp_path, capsys):
    config = _yaml_config(tmp_path, tiny_chat_model_dir)
    assert main(["train", str(config), "--set", "train.lr=5e-3", "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "adapter:" in out and "eval loss" in out
    assert "trained 3 steps: " in out and "tokens/s; peak memory " in out and "final train loss " in out
    for command in ("eval", "generate", "export"):
        assert f"  qlorafit {command} --model {tiny_chat_model_dir} --adapter {tmp_path / 'out' / 'adapter'}" in out
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "lr: 0.005" in saved and "max_steps: 3" in saved
    # A second run into the same folder is refused, with the way out in the message.
    assert main(["train", str(config)]) == 2
    assert "--resume" in capsys.readouterr().err
    adapter = str(tmp_path / "out" / "adapter")
    model = str(tiny_chat_model_dir)
    assert main(["eval", "--model", model, "--adapter", adapter, "--data", str(tmp_path / "eval.jsonl")]) == 0
    assert "perplexity" in capsys.readouterr().out
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "--model", model, "--adapter", adapter, "--data", str(tmp_path / "eval.jsonl"),
                 "--metric", "exact_match", "--max-new-tokens", "4", "--out", str(preds)]) == 0
    assert "exact match:" in capsys.readouterr().out and len(preds.read_text().splitlines()) == 4
    assert main(["generate", "--model", model, "--adapter", adapter, "--prompt", "cat", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    # the answer is transformers' own greedy decoding of the same model, adapter and chat prompt
    from qlorafit.generate import encode_prompt, stop_token_ids

    reference, tokenizer = qlorafit.load_model(model)
    qlorafit.load_adapter(reference, adapter)
    ids = torch.tensor([encode_prompt(tokenizer, "cat")])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=sorted(stop_token_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    while new and new[-1] in stop_token_ids(tokenizer):
        new.pop()  # the stop token ends the answer without being printed
    assert new and printed == tokenizer.decode(new) + "\n"


def test_config_errors_reach_the_user(tiny_chat_model_dir, tmp_path, capsys):
    config = _yaml_config(tmp_path, tiny_chat_model_dir)
    config.write_text(config.read_text().replace("lora: {r: 4, alpha: 8}", "lora: {rank: 4, alpha: 8}"))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "run.yaml:3: unknown key 'lora.rank'; did you mean 'lora.r'?" in err
    assert not (tmp_path / "out").exists()


def test_every_subcommand_has_help(capsys):
    import pytest

    for command in ([], ["train"], ["eval"], ["generate"], ["merge"], ["demo"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--help"])
        assert exc.value.code == 0
        assert "usage: qlorafit" in capsys.readouterr().out


def test_demo_keeps_an_interrupted_run_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import qlorafit.demo as demo
    from qlorafit.errors import TrainingInterrupted

    out = tmp_path / "demo"
    (out / "run" / "checkpoints" / "step-3").mkdir(parents=True)
    assert main(["demo", "--out", str(out)]) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert "interrupted demo run" in err and "qlorafit demo --resume" in err
    assert (out / "run" / "checkpoints" / "step-3").is_dir()

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGINT received: stopped after step 3 of 25 and saved X; continue with the same "
                                  "command plus --resume", 2)

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["demo", "--out", str(out), "--steps", "9"]) == 130
    err = capsys.readouterr().err
    assert "stopped after step 3 of 25 and saved X; continue with: qlorafit demo --resume" in err
    assert f"--out {out} --steps 9" in err


def test_demo_resume_reads_the_base_score_back(tmp_path):
    from qlorafit.demo import _accuracy

    path = tmp_path / "predictions-before.jsonl"
    path.write_text("".join(json.dumps({"correct": c}) + "\n" for c in (True, False, False, True)))
    assert _accuracy(path) == 0.5
    path.write_text('{"correct": true}\n{"corr')  # cut short: evaluated again
    assert _accuracy(path) is None and _accuracy(tmp_path / "missing.jsonl") is None


def test_unwritable_places_are_errors_that_say_what_to_do(tiny_chat_model_dir, tmp_path, capsys):
    config = _yaml_config(tmp_path, tiny_chat_model_dir)
    unmakeable = "/proc/qlorafit-cannot-exist/out"
    for out, says in ((unmakeable, "cannot be written"), (str(config), "is a file, not a folder")):
        assert main(["train", str(config), "--set", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"qlorafit: error: {out}: {says}" in err and "Traceback" not in err
    model = str(tiny_chat_model_dir)
    assert main(["eval", "--model", model, "--data", str(tmp_path / "eval.jsonl"), "--metric", "exact_match",
                 "--max-new-tokens", "2", "--out", "/proc/qlorafit-preds.jsonl"]) == 2
    assert "/proc/qlorafit-preds.jsonl: cannot be written" in capsys.readouterr().err
    (tmp_path / "in-the-way").write_text("a file")
    adapted, _ = qlorafit.load_model(model)
    qlorafit.add_lora(adapted, r=2)
    qlorafit.save_adapter(adapted, tmp_path / "adapter")
    assert main(["merge", "--model", model, "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "in-the-way" / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in-the-way' / 'merged'}: cannot be written" in err and "Traceback" not in err
    assert (tmp_path / "in-the-way").read_text() == "a file"


def test_a_full_disk_while_logging_metrics_stops_with_the_checkpoints_intact(tiny_chat_model_dir, tmp_path, monkeypatch):
    import builtins
    import errno

    import qlorafit.train.loop as loop
    from qlorafit.config import load_config
    from qlorafit.errors import WriteError
    from qlorafit.train.run import run_training

    config = load_config(_yaml_config(tmp_path, tiny_chat_model_dir), ["train.max_steps=4", "train.save_every=2"])
    real_open = builtins.open

    def full_after_step_2(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode and (tmp_path / "out" / "checkpoints" / "step-2").is_dir():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(loop, "open", full_after_step_2, raising=False)
    with pytest.raises(WriteError, match=r"metrics\.jsonl: cannot be written \(the disk is full\); free space .*--resume"):
        run_training(config)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.undo()
    run_training(config, resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def test_paged_optimizers_give_the_in_memory_adapters_through_the_command_line(tiny_chat_model_dir, tmp_path, capsys):
    config = _yaml_config(tmp_path, tiny_chat_model_dir)
    adapters = {}
    for optimizer in ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit"):
        out = tmp_path / optimizer
        assert main(["-q", "train", str(config), "--set", f"train.optimizer={optimizer}", "--set", "train.max_steps=3",
                     "--set", "train.weight_decay=0.01", "--set", f"output_dir={out}"]) == 0
        adapters[optimizer] = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert adapters["paged_adamw"] == adapters["adamw"] != adapters["adamw8bit"] == adapters["paged_adamw8bit"]


def test_an_interrupted_demo_resumes_to_the_uninterrupted_result(tiny_chat_model_dir, tmp_path, monkeypatch):
    import os
    import signal

    import qlorafit.demo as demo
    from qlorafit.config import build_config
    from qlorafit.errors import QlorafitError, TrainingInterrupted
    from tests.conftest import write_chat_jsonl

    def small_config(out, steps):  # the demo's flow on the tiny model and a small task
        (out / "data").mkdir(parents=True, exist_ok=True)
        write_chat_jsonl(out / "data" / "train.jsonl", 24)
        write_chat_jsonl(out / "data" / "eval.jsonl", 4, seed=1)
        return build_config({"model": str(tiny_chat_model_dir), "lora": {"r": 4, "alpha": 8},
                             "data": {"train": str(out / "data" / "train.jsonl"), "eval": str(out / "data" / "eval.jsonl"),
                                      "max_length": 64},
                             "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-3}, "output_dir": str(out / "run")})

    monkeypatch.setattr(demo, "demo_config", small_config)
    straight = demo.run_demo(tmp_path / "straight", steps=5)

    def interrupt_at_2(row):
        if row.get("step") == 2 and "loss" in row:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the step finishes, a checkpoint is saved

    out = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        demo.run_demo(out, steps=5, on_log=interrupt_at_2)
    with pytest.raises(QlorafitError, match="interrupted demo run"):
        demo.run_demo(out, steps=5)
    assert [p.name for p in (out / "run" / "checkpoints").iterdir()] == ["step-2"]
    said = []
    resumed = demo.run_demo(out, steps=5, resume=True, on_status=said.append)
    assert not any("evaluating the base model" in s for s in said)  # its score is read back
    assert resumed["before"] == straight["before"] and resumed["after"] == straight["after"]
    a, b = (p / "run" / "adapter" / "adapter_model.safetensors" for p in (tmp_path / "straight", out))
    assert a.read_bytes() == b.read_bytes()
