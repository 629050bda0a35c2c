"""The real SmolLM2-135M-Instruct with a LoRA, exported to GGUF and run by a real llama.cpp: it
continues the demo's held-out prompts token for token as qlorafit does, the LoRA adapter file on
the exported base is the merged file, and llama.cpp renders the chat template we wrote as the
tokenizer does.

Everything runs on one model, exported once per module (f32 is ~540 MB): the base as f32 before
the LoRA is added, then merged f32 and q8_0 files and the adapter file. The LoRA's B matrices are
small seeded random values, so the adapter moves the logits a little (up to ~0.4 of a range of ~66)
without breaking the model's answers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import qlorafit
from qlorafit.data.sources import read_records
from qlorafit.demo import write_demo_data
from qlorafit.export.gguf import export_gguf
from qlorafit.export.gguf_lora import export_lora_gguf
from qlorafit.generate import encode_prompt, greedy_batch, prompt_messages, stop_token_ids

from ..conftest import randomize_lora_b

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp  # noqa: E402  tests/llama_cpp.py

pytestmark = pytest.mark.real_model

N_PROMPTS = 10
MAX_NEW = 24
# q8_0 rounds the weights and, in llama.cpp's CPU dot products, the activations (blocks of 32):
# on SmolLM2 the logits at a position move by 0.5 to 2.5 (of ~40; at one prompt position of one
# prompt by 16). Greedy choices between two tokens closer than that may flip; measured gaps where
# q8_0 first departs from our tokens: 0.04 to 0.31 (over two seeds of the LoRA).
NEAR_TIE = 0.5
# the adapter file applied in llama.cpp vs the merged file: measured 7e-5 of the logit range
ADAPTER_TOL = 1e-3
# SmolLM2's template adds this turn when the conversation has no system message
SMOLLM2_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@dataclass
class Exported:
    model: torch.nn.Module
    tokenizer: object
    base: Path  # f32, before the LoRA
    f32: Path  # merged
    q8_0: Path  # merged
    adapter: Path  # f32 LoRA adapter
    prompts: list[list[int]]  # chat-templated held-out demo prompts
    stop: set[int]
    ours: list[list[int]]  # qlorafit's greedy tokens for `prompts`


def _held_out_prompts(tokenizer, folder: Path) -> list[list[int]]:
    _, held_out = write_demo_data(folder)
    return [encode_prompt(tokenizer, prompt_messages(r)) for r in read_records(held_out)[:N_PROMPTS]]


@pytest.fixture(scope="module")
def exported(smollm2_path, tmp_path_factory) -> Exported:
    llama_cpp.require()
    out = tmp_path_factory.mktemp("smollm2-gguf")
    model, tokenizer = qlorafit.load_model(smollm2_path, quant="none")
    base = export_gguf(model, tokenizer, out / "base-f32.gguf", type="f32")
    torch.manual_seed(0)  # before add_lora: its A matrices are random too
    qlorafit.add_lora(model, r=8, alpha=16)
    randomize_lora_b(model, 0.002)
    f32 = export_gguf(model, tokenizer, out / "merged-f32.gguf", type="f32")
    q8_0 = export_gguf(model, tokenizer, out / "merged-q8_0.gguf", type="q8_0")
    adapter = export_lora_gguf(model, out / "adapter-f32.gguf", type="f32")
    prompts = _held_out_prompts(tokenizer, out / "demo")
    stop = set(stop_token_ids(tokenizer))
    ours = greedy_batch(model, prompts, MAX_NEW, stop, batch_size=N_PROMPTS, pad_token_id=tokenizer.pad_token_id)
    return Exported(model.eval(), tokenizer, base, f32, q8_0, adapter, prompts, stop, ours)


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_llama_cpp_continues_the_f32_file_exactly_as_we_do(exported):
    assert len(exported.prompts) == N_PROMPTS
    assert any(len(t) == MAX_NEW for t in exported.ours)  # answers long enough to test the KV cache path
    theirs = [llama_cpp.greedy(exported.f32, p, MAX_NEW, exported.stop) for p in exported.prompts]
    differing = [i for i, (a, b) in enumerate(zip(theirs, exported.ours, strict=True)) if a != b]
    assert not differing, f"llama.cpp's greedy tokens differ from ours for prompts {differing}"


def _gap_where_they_part(exported: Exported, prompt: list[int], ours: list[int], theirs: list[int]) -> float:
    """How far (in logits) our model prefers its token over llama.cpp's at the first step where they differ."""
    k = next(i for i, (a, b) in enumerate(zip([*ours, None], [*theirs, None], strict=False)) if a != b)
    row = _logits(exported.model, prompt + ours[:k])[-1]
    theirs_choices = [theirs[k]] if k < len(theirs) else sorted(exported.stop)  # llama.cpp stopped at k
    return float(row.max() - max(row[c] for c in theirs_choices))


def test_q8_0_file_is_llama_cpps_own_q8_0_and_departs_from_us_only_at_near_ties(exported, tmp_path):
    """Our q8_0 file is byte for byte llama.cpp's quantization of our f32 file, so whatever it does is
    what Q8_0 does: its greedy tokens are ours up to a step where our two best tokens are within
    NEAR_TIE logits (measured: 7 of the 10 prompts agree throughout; the 3 others part at gaps of
    0.04, 0.09 and 0.16). All 10 agreeing, or 9, is more than Q8_0 on SmolLM2 gives."""
    reference = tmp_path / "llama-q8_0.gguf"
    llama_cpp.quantize(exported.f32, reference, "Q8_0")
    mine, ref = gguf.GGUFReader(exported.q8_0), gguf.GGUFReader(reference)
    by_name = {t.name: t for t in ref.tensors}
    assert sorted(by_name) == sorted(t.name for t in mine.tensors)
    for a in mine.tensors:
        b = by_name[a.name]
        assert a.tensor_type == b.tensor_type, a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    del mine, ref, by_name
    theirs = [llama_cpp.greedy(exported.q8_0, p, MAX_NEW, exported.stop) for p in exported.prompts]
    parted = {i: _gap_where_they_part(exported, exported.prompts[i], exported.ours[i], t)
              for i, t in enumerate(theirs) if t != exported.ours[i]}
    assert len(parted) <= N_PROMPTS // 2, f"q8_0 greedy tokens differ from ours for {len(parted)} of {N_PROMPTS}"
    wide = {i: round(g, 3) for i, g in parted.items() if g >= NEAR_TIE}
    assert not wide, f"q8_0 left our greedy path where we prefer our token by >= {NEAR_TIE} logits: {wide}"


def test_the_adapter_file_on_the_base_file_is_the_merged_file(exported):
    ids = exported.prompts[0][:16]
    merged = llama_cpp.logits(exported.f32, ids)
    plain = llama_cpp.logits(exported.base, ids)
    adapted = llama_cpp.logits(exported.base, ids, lora=exported.adapter)
    scale = float(merged.max() - merged.min())
    err = float(np.abs(adapted - merged).max())
    assert err <= ADAPTER_TOL * scale, f"max |base + adapter - merged| = {err:.3g} (logit range {scale:.3g})"
    assert float(np.abs(plain - merged).max()) > 100 * err  # the adapter does something, far above the error
    assert float(np.abs(merged - _logits(exported.model, ids)).max()) <= 1e-5 * scale  # and the merged file is ours
    # greedy generation with the adapter applied follows our model too
    assert llama_cpp.greedy(exported.base, exported.prompts[0], MAX_NEW, exported.stop,
                            lora=exported.adapter) == exported.ours[0]


CONVERSATION = [
    {"role": "system", "content": "You convert orders to JSON."},
    {"role": "user", "content": "Order 1: Ana Ito bought 2 items on May 1, 2020."},
    {"role": "assistant", "content": '{"order": 1, "customer": "Ana Ito", "items": 2, "date": "2020-05-01"}'},
    {"role": "user", "content": "Order 2: Wei Novak bought 7 items on June 9, 2021."},
]


def test_llama_cpp_renders_the_files_chat_template_as_the_tokenizer_does(exported):
    tokenizer, path = exported.tokenizer, exported.f32
    assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    rendered = llama_cpp.chat_template_prompt(path, CONVERSATION)
    assert rendered == expected
    assert llama_cpp.tokenize(path, rendered, add_special=False, parse_special=True) == encode_prompt(
        tokenizer, CONVERSATION)
    assert llama_cpp.chat_template_prompt(path, CONVERSATION, add_generation_prompt=False) == \
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)


def test_without_a_system_message_llama_cpp_leaves_out_smollm2s_default_system_turn(exported):
    """llama.cpp without --jinja runs no Jinja: it recognises SmolLM2's template as ChatML and writes
    ChatML itself, so the default system turn the template adds is missing (a llama.cpp limitation;
    the template in the file is the tokenizer's, checked above; Jinja runners render it in full)."""
    conversation = CONVERSATION[1:]
    expected = exported.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert expected.startswith(SMOLLM2_DEFAULT_SYSTEM)
    assert llama_cpp.chat_template_prompt(exported.f32, conversation) == expected.removeprefix(SMOLLM2_DEFAULT_SYSTEM)
