"""The command line: merge end to end on a tiny model, errors as messages."""

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
