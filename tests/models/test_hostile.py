"""Hostile and broken model files: pickles, remote code, truncated GGUF, corrupt adapters."""

import json

import pytest
import torch

import qlorafit
from qlorafit.errors import AdapterError, ModelLoadError
from tests.conftest import build_tiny, token_batch


class _RunsCode:
    """Unpickling this runs a command: what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_need_the_flag_and_load_only_tensors(tmp_path):
    model = build_tiny("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ModelLoadError, match="pickled weights.*--allow-pickle"):
        qlorafit.load_model(tmp_path, quant="none")
    ours, _ = qlorafit.load_model(tmp_path, quant="none", allow_pickle=True)
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(x).logits, model(x).logits)

    marker = tmp_path / "pwned"
    state = {k: v for k, v in model.state_dict().items()}
    state["evil"] = _RunsCode(marker)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: cannot be loaded as plain tensors"):
        qlorafit.load_model(tmp_path, quant="none", allow_pickle=True)
    assert not marker.exists()  # the payload never ran


def test_model_code_runs_only_when_trusted(tmp_path):
    config = build_tiny("llama").config.to_dict()
    config["model_type"] = "my-custom-llama"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_custom.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json.*trust_remote_code"):
        qlorafit.load_model(tmp_path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.real_model
def test_truncated_gguf_names_the_file(tmp_path, smollm2_path):
    data = smollm2_path.read_bytes()
    for cut in (16, 4096, len(data) // 2):
        broken = tmp_path / f"cut-{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=rf"cut-{cut}\.gguf"):
            qlorafit.load_model(broken)


def test_corrupt_adapter_files_name_the_file(tmp_path, tiny_model_dir):
    model, _ = qlorafit.load_model(tiny_model_dir("llama"))
    qlorafit.add_lora(model, r=4, alpha=8)
    qlorafit.save_adapter(model, tmp_path / "a")
    fresh, _ = qlorafit.load_model(tiny_model_dir("llama"))
    config = tmp_path / "a" / "adapter_config.json"
    good = config.read_text()
    for bad in ("{", "[]", json.dumps({**json.loads(good), "r": "sixteen"}), ""):
        config.write_text(bad)
        with pytest.raises(AdapterError, match="adapter_config.json"):
            qlorafit.load_adapter(fresh, tmp_path / "a")
    config.write_text(good)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises((AdapterError, ModelLoadError), match="adapter_model.safetensors"):
        qlorafit.load_adapter(fresh, tmp_path / "a")
