"""GGUF export, read by a second implementation: transformers' own GGUF loader gives our merged
model's logits from our f32 and q8_0 files, agrees with llama.cpp on the q8_0 file, and builds a
tokenizer from our file that tokenizes as ours does (tiny random llama and qwen2 models)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import qlorafit
from qlorafit.export.gguf import export_gguf

from ..conftest import randomize_lora_b
from .test_gguf_export import IDS, _folder, _ours, _tokenizer_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp  # noqa: E402  tests/llama_cpp.py

# relative to the largest |logit| of our model; measured on these models:
F32_TOL = 1e-5  # transformers on our f32 file vs our model: ~7e-7
Q8_0_TOL = 0.05  # transformers on our q8_0 file vs our model: 1.3-1.7e-2 (the weights rounded to Q8_0)
Q8_0_LLAMA_CPP_TOL = 0.05  # transformers vs llama.cpp, both on the q8_0 file: 1.2-2.1e-2 (llama.cpp also
#                            rounds the activations to Q8_0 in its dot products)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά.",
    "numbers 12345 and 3.14159, dates 2021-03-05, money $1,000,000",
    "def f(x):\n    return {'a': [1, 2]}  # code\n\n\ttabs\r\n   spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing  ",
]


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp():
    llama_cpp.require()


@dataclass
class Files:
    family: str
    ours: np.ndarray  # our merged model's logits on IDS
    folder: Path  # holds f32.gguf and q8_0.gguf


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def files(request, tmp_path_factory) -> Files:
    """A tiny random model of the family with a LoRA (seeded, B non-zero), exported as f32 and q8_0."""
    family = request.param
    model, _ = qlorafit.load_model(_folder(family, tmp_path_factory.mktemp("hf")), quant="none")
    torch.manual_seed(0)
    qlorafit.add_lora(model, r=4, alpha=8)
    randomize_lora_b(model, 0.1)
    folder = tmp_path_factory.mktemp(f"{family}-gguf")
    for file_type in ("f32", "q8_0"):  # SmolLM2's tokenizer as it is, as in test_gguf_export
        export_gguf(model, _tokenizer_for(family), folder / f"{file_type}.gguf", type=file_type)
    return Files(family, _ours(model), folder)


def _transformers_logits(files: Files, name: str) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(files.folder, gguf_file=name, dtype=torch.float32)
    assert model.config.model_type == files.family
    with torch.no_grad():
        return model.eval()(torch.tensor([IDS])).logits[0].float().numpy()


def _assert_close(theirs: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    scale = float(np.abs(expected).max())
    err = float(np.abs(theirs - expected).max())
    assert err <= tol * scale, f"max |{what}| = {err:.3g} (logits up to {scale:.3g})"


def test_transformers_reads_our_f32_file_as_our_model(files):
    _assert_close(_transformers_logits(files, "f32.gguf"), files.ours, F32_TOL, "transformers - ours")


def test_transformers_reads_our_q8_0_file_as_llama_cpp_does(files):
    theirs = _transformers_logits(files, "q8_0.gguf")
    _assert_close(theirs, files.ours, Q8_0_TOL, "transformers(q8_0) - ours")
    _assert_close(theirs, llama_cpp.logits(files.folder / "q8_0.gguf", IDS), Q8_0_LLAMA_CPP_TOL,
                  "transformers(q8_0) - llama.cpp(q8_0)")


def test_transformers_tokenizer_from_our_file_tokenizes_as_ours(files):
    ours = _tokenizer_for(files.family)
    theirs = transformers.AutoTokenizer.from_pretrained(files.folder, gguf_file="f32.gguf")
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours(text, add_special_tokens=False)["input_ids"], text
    assert (theirs.bos_token, theirs.eos_token) == (ours.bos_token, ours.eos_token)
    assert theirs.decode(ours(TEXTS[1], add_special_tokens=False)["input_ids"]) == TEXTS[1]
