"""Every model family a user may bring, on tiny random models built here.

For each family: an HF folder loads with transformers' exact logits; the NF4 load stores the same
bytes as bitsandbytes; a short QLoRA run lowers the loss; the adapter loads in PEFT with the same
logits; `all-linear` picks PEFT's layers. Written as a GGUF file (llama.cpp's names and layouts),
it loads with the logits of the model it came from and of transformers' own GGUF loader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import qlorafit
from qlorafit.lora.inject import find_targets
from qlorafit.quant.linear4bit import Linear4bit
from qlorafit.quant.param4bit import quantized_parameters
from tests.conftest import LazyPeer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_from_hf import VOCAB_SIZE, write_gguf_from_hf  # noqa: E402

bnbf = LazyPeer("bitsandbytes.functional")
peft = LazyPeer("peft")

SIZES = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)

# family -> (config, llama.cpp architecture or None when not checked as GGUF, and whether transformers'
# GGUF loader builds the same model: it has no Gemma (1) and ignores a Qwen3 head width, Gemma 2 soft-capping and
# Falcon's new decoder layout, so those
# are checked against the model the file was written from only)
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**SIZES, **ATTN, tie_word_embeddings=True), "llama"),
    "mistral": (lambda: transformers.MistralConfig(**SIZES, **ATTN, sliding_window=4, tie_word_embeddings=False), None),
    # llama.cpp writes Mistral as llama (named "mistral"), without a sliding window
    "mistral_gguf": (lambda: transformers.MistralConfig(**SIZES, **ATTN, sliding_window=None), "llama"),
    "qwen2": (lambda: transformers.Qwen2Config(**SIZES, **ATTN, tie_word_embeddings=False), "qwen2"),
    "qwen3": (lambda: transformers.Qwen3Config(**SIZES, **ATTN, tie_word_embeddings=True), "qwen3"),
    "qwen3_narrow_heads": (lambda: transformers.Qwen3Config(**SIZES, **ATTN, head_dim=16), "qwen3", False),
    "qwen3_moe": (
        lambda: transformers.Qwen3MoeConfig(**SIZES, **ATTN, head_dim=16, num_experts=4,
                                            num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False),
        "qwen3moe",
    ),
    "qwen2_moe": (
        lambda: transformers.Qwen2MoeConfig(**SIZES, **ATTN, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                            num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        "qwen2moe", False,
    ),
    "phi3": (lambda: transformers.Phi3Config(**SIZES, **ATTN, pad_token_id=0, tie_word_embeddings=False), "phi3"),
    "gemma": (lambda: transformers.GemmaConfig(**SIZES, **ATTN, head_dim=16), "gemma", False),
    "gemma2": (
        lambda: transformers.Gemma2Config(**SIZES, **ATTN, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                          final_logit_softcapping=5.0, attn_logit_softcapping=5.0),
        "gemma2", False,
    ),
    # head width 256 = transformers' default query_pre_attn_scalar, which is what llama.cpp scales by
    "gemma3": (lambda: transformers.Gemma3TextConfig(**SIZES, **ATTN, head_dim=256, sliding_window=4), "gemma3"),
    "starcoder2": (lambda: transformers.Starcoder2Config(**SIZES, **ATTN, tie_word_embeddings=True), "starcoder2"),
    "stablelm": (lambda: transformers.StableLmConfig(**SIZES, **ATTN, tie_word_embeddings=False), "stablelm"),
    "falcon": (
        lambda: transformers.FalconConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=256),
        "falcon",
    ),
    "falcon_new_decoder": (
        lambda: transformers.FalconConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=256),
        "falcon", False,
    ),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4), "gpt2"),
}  # fmt: skip


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval()
    with torch.no_grad():  # non-trivial norms and biases, and weights large enough to matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = tmp_path_factory.mktemp(family)
            _build(family).save_pretrained(cache[family])
        return cache[family]

    return make


def _reference(folder: Path, **kwargs) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_gives_transformers_logits(family, folders):
    model, _ = qlorafit.load_model(folders(family), quant="none")
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, _reference(folders(family))(_ids()).logits)


def _bnb_nf4(weight: torch.Tensor):
    return bnbf.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_stores_bitsandbytes_bytes(family, folders):
    model, _ = qlorafit.load_model(folders(family), quant="nf4")
    reference = _reference(folders(family))  # becomes the float model with bitsandbytes' round trip
    head = reference.get_output_embeddings()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    linears = {n for n, m in reference.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    assert layers and set(layers) == linears - {n for n, m in reference.named_modules() if m is head}
    with torch.no_grad():
        for name, layer in layers.items():
            module = reference.get_submodule(name)
            weight = module.weight.t() if layer.conv1d_layout else module.weight
            packed, state = _bnb_nf4(weight)
            assert torch.equal(layer.weight.view(-1), packed.view(-1)), name
            restored = bnbf.dequantize_4bit(packed, state)
            assert torch.equal(layer.dequantize(), restored), name
            module.weight.copy_(restored.t() if layer.conv1d_layout else restored)
        # fused 3-D experts: 4-bit over the flattened values, where bitsandbytes leaves them in float
        experts = quantized_parameters(model)
        assert bool(experts) == family.endswith("_moe")
        for name in experts:
            module_name, _, attr = name.rpartition(".")
            exact = getattr(reference.get_submodule(module_name), attr)
            packed, state = _bnb_nf4(exact.reshape(-1))
            restored = bnbf.dequantize_4bit(packed, state).reshape(exact.shape)
            assert torch.equal(getattr(model.get_submodule(module_name), attr), restored), name
            exact.copy_(restored)
        assert (model(_ids()).logits - reference(_ids()).logits).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_is_peft_all_linear(family, folders):
    model, _ = qlorafit.load_model(folders(family), quant="none")
    wrapped = peft.get_peft_model(_reference(folders(family)), peft.LoraConfig(r=2, target_modules="all-linear"))
    layers = {n.removeprefix("base_model.model."): m for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    linear = sorted(n for n, m in layers.items() if isinstance(m, peft.tuners.lora.Linear))
    assert sorted(find_targets(model, "all-linear")) == linear
    # what PEFT adds beyond linear layers is LoRA on fused expert / router parameters, which qlorafit does not do
    others = {type(m).__name__ for n, m in layers.items() if n not in linear}
    assert others <= ({"ParamWrapper"} if family.endswith("_moe") else set())


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_run_lowers_the_loss_and_the_adapter_loads_in_peft(family, folders, tmp_path):
    model, _ = qlorafit.load_model(folders(family), quant="nf4")
    qlorafit.add_lora(model, r=4, alpha=8)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids(2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    qlorafit.save_adapter(model, tmp_path / "adapter")

    # the adapter on the float model: same logits in qlorafit and in PEFT
    ours, _ = qlorafit.load_model(folders(family), quant="none")
    qlorafit.load_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_reference(folders(family)), tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        a, b = ours(_ids()).logits, theirs(_ids()).logits
        with theirs.disable_adapter():
            base = theirs(_ids()).logits
    assert (a - b).abs().max() < 1e-4
    assert (b - base).abs().max() > 1e-3  # the adapter changes the output


GGUF_FAMILIES = [f for f, (_, arch, *_) in FAMILIES.items() if arch]


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_gives_the_logits_of_its_model_and_of_transformers(family, tmp_path):
    source = _build(family)
    path = write_gguf_from_hf(source, tmp_path / f"{family}.gguf", FAMILIES[family][1], name=f"tiny-{family}")
    model, tokenizer = qlorafit.load_model(path, quant="none")
    with torch.no_grad():
        ours, original = model(_ids()).logits, source(_ids()).logits
    torch.testing.assert_close(ours, original, rtol=1e-5, atol=1e-5 * original.abs().max().item())
    nf4, _ = qlorafit.load_model(path, quant="nf4")
    assert any(isinstance(m, Linear4bit) for m in nf4.modules())
    if len(FAMILIES[family]) > 2:  # transformers cannot read this file as the model it is
        return
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(_ids()).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("the cat sat on the mat", "  in <|im_end|> the\nend"):
        assert tokenizer(text)["input_ids"] == their_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == their_tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_moe_merged_folder_loads_in_transformers(folders, tmp_path):
    model, _ = qlorafit.load_model(folders("qwen3_moe"), quant="nf4")
    qlorafit.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    qlorafit.save_merged(model, None, tmp_path / "merged")
    merged = _reference(tmp_path / "merged")
    with torch.no_grad():
        assert (model.eval()(_ids()).logits - merged(_ids()).logits).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gemma3", "qwen2_moe"])
def test_training_run_on_a_gguf_of_another_family(family, tmp_path):
    """The path users run: a GGUF file (tokenizer and chat template from it), chat records, run_training."""
    from qlorafit.config import build_config
    from qlorafit.train.run import run_training
    from tests.conftest import write_chat_jsonl

    path = write_gguf_from_hf(_build(family), tmp_path / f"{family}.gguf", FAMILIES[family][1], name=f"tiny-{family}")
    write_chat_jsonl(tmp_path / "train.jsonl", 16)
    write_chat_jsonl(tmp_path / "eval.jsonl", 8, seed=1)
    config = build_config({
        "model": str(path), "quant": {"type": "nf4"}, "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 64},
        "train": {"batch_size": 4, "lr": 1e-2, "seed": 0, "epochs": 2, "eval_every": 4},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    run_training(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["target_modules"]
