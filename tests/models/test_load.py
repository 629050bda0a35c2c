"""load_model on HF folders (single, sharded, bitsandbytes 4-bit), GGUF and bad paths."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import qlorafit
from qlorafit.errors import ModelLoadError, QuantizationError
from qlorafit.quant.linear4bit import Linear4bit
from tests.conftest import LazyPeer, build_tiny, token_batch

bnbf = LazyPeer("bitsandbytes.functional")
ARCHS = ["llama", "qwen2", "gpt2"]


def _reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_load_gives_the_transformers_logits(arch, tiny_model_dir):
    folder = tiny_model_dir(arch)
    model, tok = qlorafit.load_model(folder, quant="none")
    assert tok is None  # the tiny folders carry no tokenizer
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, _reference(folder)(x).logits)
    assert not any(p.requires_grad for p in model.parameters())


def _bnb_roundtrip_reference(folder, quant_type, blocksize, double_quant):
    """transformers' model with every non-head linear weight replaced by bitsandbytes' dequant(quant(W))."""
    ref = _reference(folder)
    head = ref.get_output_embeddings()
    with torch.no_grad():
        for module in ref.modules():
            is_conv = type(module).__name__ == "Conv1D"
            if (isinstance(module, nn.Linear) or is_conv) and module is not head:
                w = module.weight.t() if is_conv else module.weight
                q, s = bnbf.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=quant_type,
                                          compress_statistics=double_quant)
                dq = bnbf.dequantize_4bit(q, s)
                module.weight.copy_(dq.t() if is_conv else dq)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 128, False)])
def test_quantized_load_matches_bitsandbytes_quantization(arch, quant_type, blocksize, double_quant, tiny_model_dir):
    folder = tiny_model_dir(arch)
    model, _ = qlorafit.load_model(folder, quant=quant_type, blocksize=blocksize, double_quant=double_quant)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == {"llama": 14, "qwen2": 14, "gpt2": 8}[arch]
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # the head stays in float
    ref = _bnb_roundtrip_reference(folder, quant_type, blocksize, double_quant)
    x = token_batch()
    with torch.no_grad():
        assert (model(x).logits - ref(x).logits).abs().max() < 1e-5


def test_sharded_folder_loads(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = qlorafit.load_model(tmp_path, quant="none")
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, _reference(tmp_path)(x).logits)


def test_bitsandbytes_4bit_checkpoint_loads_without_requantizing(tiny_model_dir, tmp_path):
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    bnb_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), quantization_config=cfg).eval()
    bnb_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["load_in_4bit"]

    model, _ = qlorafit.load_model(tmp_path)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(ours) == 14
    compared = [name for name, _ in bnb_model.named_modules() if name in ours]
    assert sorted(compared) == sorted(ours)  # every 4-bit layer is compared
    for name in compared:
        module = bnb_model.get_submodule(name)
        assert torch.equal(ours[name].weight, module.weight.data)  # the very same packed codes
        assert torch.equal(ours[name].dequantize(), bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state))
    x = token_batch()
    with torch.no_grad():
        assert (model(x).logits - bnb_model(x).logits).abs().max() < 1e-4
    assert model.qlorafit_source["quant"] == "bnb-4bit"


def test_our_linear4bit_state_dict_is_what_bitsandbytes_saves(tiny_model_dir):
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    folder = tiny_model_dir("llama")
    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg).state_dict()
    model, _ = qlorafit.load_model(folder)
    ours = model.state_dict()
    quant_keys = [k for k in theirs if "self_attn" in k or "mlp" in k]
    assert quant_keys
    for key in quant_keys:
        assert torch.equal(ours[key], theirs[key]), key


def test_bad_paths_and_settings(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        qlorafit.load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        qlorafit.load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled weights .*pytorch_model.bin.*convert them to safetensors"):
        qlorafit.load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown quant 'int8'"):
        qlorafit.load_model(tmp_path, quant="int8")
    with pytest.raises(QuantizationError, match="blocksize 100"):
        qlorafit.load_model(tmp_path, blocksize=100)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        qlorafit.load_model(tmp_path / "pytorch_model.bin")


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for broken, why in [(data[: len(data) // 2], "points at bytes"), (data[:5], "too short"),
                        (data[:8] + b"{not json" + data[17:], "not valid JSON"),
                        ((2**40).to_bytes(8, "little") + data[8:], "header length")]:
        weights.write_bytes(broken)
        with pytest.raises(ModelLoadError, match=rf"model.safetensors: .*{why}.*truncated or corrupt"):
            qlorafit.load_model(tmp_path)
    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight has shape .* but the model built from its config expects"):
        qlorafit.load_model(tmp_path)
    config["intermediate_size"] = 128
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"lacks weights the model needs: model.layers.2"):
        qlorafit.load_model(tmp_path)


@pytest.mark.real_model
def test_smollm2_alias_loads_and_answers(smollm2_path):
    model, tok = qlorafit.load_model("smollm2-135m-instruct", quant="nf4")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 30 * 7
    ref = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    # NF4 moves the logits a little, not the prediction.
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("arch", ARCHS)
def test_on_layer_sees_each_decoder_layer_once_and_complete(arch, tiny_model_dir):
    from qlorafit.models.load import layer_stack

    seen = []

    def on_layer(name, layer):
        assert not [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if t.device.type == "meta"]
        assert any(isinstance(m, Linear4bit) for m in layer.modules())
        seen.append(name)

    model, _ = qlorafit.load_model(tiny_model_dir(arch), quant="nf4", on_layer=on_layer)
    stack_name, stack = layer_stack(model)
    assert sorted(seen) == sorted(f"{stack_name}.{i}" for i in range(len(stack))) and len(seen) == len(set(seen))
    plain, _ = qlorafit.load_model(tiny_model_dir(arch), quant="nf4")
    ids = token_batch()
    assert torch.equal(model(ids).logits, plain(ids).logits)  # the hook changes nothing by itself
