"""`qlorafit export`: the command a user runs after training, end to end, and its refusals."""

from __future__ import annotations

import transformers

import qlorafit
from qlorafit.cli import main

from ..conftest import randomize_lora_b
from .test_gguf_export import IDS, _folder, _ours, llama_cpp


def _trained_adapter(model_dir, out, quant="nf4"):
    """An adapter folder as a run leaves it: PEFT files, the tokenizer, the run's config.yaml beside it."""
    model, tokenizer = qlorafit.load_model(model_dir, quant=quant)
    qlorafit.add_lora(model, r=4, alpha=8)
    randomize_lora_b(model, 0.1, seed=2)
    adapter = out / "run" / "adapter"
    qlorafit.save_adapter(model, adapter)
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter)
    (out / "run" / "config.yaml").write_text(f"model: {model_dir}\nquant:\n  type: {quant}\n")
    return model, adapter


def test_export_merges_the_run_like_it_trained_and_writes_a_modelfile(tmp_path, capsys):
    model_dir = _folder("llama", tmp_path / "hf")
    model, adapter = _trained_adapter(model_dir, tmp_path)
    out = tmp_path / "out" / "model.gguf"
    code = main(["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out), "--type", "f32",
                 "--ollama", str(tmp_path / "out"), "--system", "Answer briefly."])
    assert code == 0, capsys.readouterr().err
    # --quant auto took nf4 from the run's config.yaml: the file computes the NF4 base + adapter it trained
    native = llama_cpp.logits(out, IDS)
    expected = _ours(model)
    assert abs(native - expected).max() <= 1e-4 * abs(expected).max()
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "Answer briefly." in modelfile


def test_lora_only_writes_an_adapter_and_refusals_leave_nothing(tmp_path, capsys):
    model_dir = _folder("llama", tmp_path / "hf")
    _, adapter = _trained_adapter(model_dir, tmp_path, quant="none")
    lora = tmp_path / "adapter.gguf"
    assert main(["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(lora),
                 "--lora-only"]) == 0
    assert lora.stat().st_size > 0
    # an Ollama ADAPTER needs the base as a GGUF file
    code = main(["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "a2.gguf"),
                 "--lora-only", "--ollama", str(tmp_path / "ollama")])
    assert code == 2 and "GGUF" in capsys.readouterr().err
    # an adapter trained on a model of other shapes
    other = tmp_path / "wider"
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.intermediate_size = 128
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    _, foreign = _trained_adapter(other, tmp_path / "q", quant="none")
    code = main(["export", "--model", str(model_dir), "--adapter", str(foreign), "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "mlp" in err and "shape" in err, err
    # an unknown type and a path that cannot be written
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "y.gguf"), "--type", "q9"]) == 2
    assert "q4_k_m" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--out", "/proc/qlorafit/z.gguf", "--type", "f16"]) == 2
    assert "/proc/qlorafit/z.gguf: cannot be written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if ".gguf" in p.name) == ["adapter.gguf"]


def test_ollama_refusals_come_before_the_export(tmp_path, capsys):
    """A system prompt the template has no place for fails before the GGUF file is written."""
    model_dir = _folder("llama", tmp_path / "hf")
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                 "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                 "{# " + "longer than a file name may be " * 10 + "#}")
    out = tmp_path / "m.gguf"
    code = main(["export", "--model", str(model_dir), "--out", str(out), "--type", "f16", "--chat-template", no_system,
                 "--ollama", str(tmp_path / "ollama"), "--system", "Be brief."])
    assert code == 2 and "system" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "ollama").exists()
