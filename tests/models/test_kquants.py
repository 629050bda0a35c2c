"""K-quant and IQ GGUF files made by llama.cpp's own quantizer (llama-cpp-cffi), read back here.

A tiny random llama is written in F32 and quantized by llama.cpp; the loaded weights must be the
values gguf-py decodes from the same bytes, the logits those of transformers' GGUF loader on the
same file, and close to the logits llama.cpp itself computes (which also quantizes activations).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import qlorafit
from qlorafit.errors import ModelLoadError
from qlorafit.models.gguf import gguf_config, iter_gguf_tensors, open_gguf
from qlorafit.models.meta import empty_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp  # noqa: E402
from tiny_gguf import VOCAB_SIZE, write_tiny_llama_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
# llama.cpp file type -> the block types its tensors must include
FTYPES = {
    "Q4_K_M": {Q.Q4_K, Q.Q6_K}, "Q2_K": {Q.Q2_K, Q.Q3_K}, "Q3_K_M": {Q.Q3_K}, "Q5_K_M": {Q.Q5_K},
    "Q6_K": {Q.Q6_K}, "IQ4_NL": {Q.IQ4_NL}, "IQ4_XS": {Q.IQ4_XS}, "Q5_1": {Q.Q5_1},
}  # fmt: skip
TOKENS = [5, 61, 200, 17, 298, 3, 150, 77, 256, 9, 42, 120]


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory) -> Path:
    llama_cpp.require()
    path = tmp_path_factory.mktemp("kquant") / "tiny-f32.gguf"
    write_tiny_llama_gguf(path, np.random.default_rng(0))
    return path


@pytest.fixture(scope="module")
def quantized(f32_file):
    cache: dict[str, Path] = {}

    def make(ftype: str) -> Path:
        if ftype not in cache:
            cache[ftype] = f32_file.with_name(f"tiny-{ftype}.gguf")
            llama_cpp.quantize(f32_file, cache[ftype], ftype)
        return cache[ftype]

    return make


@pytest.mark.parametrize("ftype", FTYPES)
def test_llama_cpp_quantized_file_loads_like_transformers_and_llama_cpp(ftype, quantized):
    path = quantized(ftype)
    file = open_gguf(path)
    assert FTYPES[ftype] <= {Q(t.qtype) for t in file.tensors}  # the quantizer really wrote those types
    # weights: the values gguf-py decodes from the file's bytes (transformers' kernels or ours)
    config = gguf_config(path)
    loaded = dict(iter_gguf_tensors(path, empty_model(config)))
    embedding = next(t for t in file.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(file.data(embedding).reshape(embedding.shape[0], -1), Q(embedding.qtype))
    np.testing.assert_allclose(loaded["model.embed_tokens.weight"].numpy(), expected, rtol=1e-6, atol=1e-7)

    model, tokenizer = qlorafit.load_model(path, quant="none")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        ours, theirs = model(ids).logits[0], reference.eval()(ids).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    # llama.cpp quantizes activations for its K-quant dot products: close, not equal
    native = torch.from_numpy(llama_cpp.logits(path, TOKENS))
    assert native.shape == (len(TOKENS), VOCAB_SIZE)
    assert (ours - native).abs().max() < 0.05 * native.abs().max()


def test_qlora_on_a_k_quant_file(quantized):
    model, _ = qlorafit.load_model(quantized("Q4_K_M"), quant="nf4")
    qlorafit.add_lora(model, r=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([TOKENS])
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_truncated_k_quant_file(quantized, tmp_path):
    data = quantized("Q4_K_M").read_bytes()
    path = tmp_path / "cut-q4_k_m.gguf"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as error:
        qlorafit.load_model(path)
    assert "cut-q4_k_m.gguf" in str(error.value) and "blk." in str(error.value)
