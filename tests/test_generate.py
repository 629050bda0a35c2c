from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import qlorafit
from qlorafit.data.records import Record
from qlorafit.errors import DataError
from qlorafit.generate import (
    GenerationError,
    encode_prompt,
    generate_batch,
    generate_text,
    generate_tokens,
    greedy_batch,
    prompt_messages,
    reference,
    stop_token_ids,
    stream_text,
)
from qlorafit.lora.inject import lora_layers
from tests.conftest import build_tiny, byte_tokenizer

PROMPT = [5, 17, 3, 99, 42]


def lively(model: nn.Module, scale: float = 10.0) -> nn.Module:
    """Scale the matrices of a tiny random model so its greedy output does not repeat one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def byte_model(seed: int = 0) -> nn.Module:
    """A lively tiny llama whose vocabulary fits byte_tokenizer()."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(byte_tokenizer()), max_position_embeddings=256)
    return lively(AutoModelForCausalLM.from_config(config).eval())


def hf_greedy(model: nn.Module, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding of exactly n tokens (no eos)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def with_random_lora(model: nn.Module) -> nn.Module:
    qlorafit.add_lora(model, r=4, alpha=8)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory):
    cache = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = tmp_path_factory.mktemp(f"lively-{arch}")
            lively(build_tiny(arch)).save_pretrained(cache[arch])
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", ["float", "lora", "nf4", "nf4+lora"])
def test_greedy_matches_transformers_generate(arch, variant, lively_dir):
    if variant.startswith("nf4"):
        model, _ = qlorafit.load_model(lively_dir(arch), quant="nf4")
        assert any(isinstance(m, qlorafit.Linear4bit) for m in model.modules())
    else:
        model = lively(build_tiny(arch))
    if variant.endswith("lora"):
        before = list(generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[]))
        with_random_lora(model)
        assert list(generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[])) != before
    ours = list(generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[]))
    assert ours == hf_greedy(model, PROMPT, 10)
    assert len(set(ours)) > 2  # a sequence that would show a broken cache


def test_greedy_matches_a_full_recompute_without_cache():
    model = lively(build_tiny("gpt2"))
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert list(generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[])) == seq[len(PROMPT):]


def test_eval_mode_while_generating_and_flags_restored():
    model = with_random_lora(lively(build_tiny("llama")))
    expected = list(generate_tokens(model, PROMPT, max_new_tokens=8, eos_token_ids=[]))
    model.lora_config.dropout = 0.5
    for layer in lora_layers(model).values():
        layer.lora_dropout = nn.Dropout(0.5)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    got = []
    for token in generate_tokens(model, PROMPT, max_new_tokens=8, eos_token_ids=[]):
        assert not torch.is_inference_mode_enabled() and not model.training
        got.append(token)
    assert got == expected  # no dropout while generating
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_stops_at_eos_without_yielding_it():
    model = lively(build_tiny("llama"))
    full = list(generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[]))
    k = next(i for i, t in enumerate(full) if i > 0 and t not in full[:i])
    assert list(generate_tokens(model, PROMPT, max_new_tokens=10, eos_token_ids=[full[k]])) == full[:k]
    assert list(generate_tokens(model, PROMPT, max_new_tokens=3, eos_token_ids=[])) == full[:3]
    assert list(generate_tokens(model, PROMPT, max_new_tokens=0)) == []
    model.generation_config.eos_token_id = full[k]  # None: the model's own eos ids
    assert list(generate_tokens(model, PROMPT, max_new_tokens=10)) == full[:k]


def test_context_limit_and_bad_settings():
    model = build_tiny("llama")  # 128 positions
    assert len(list(generate_tokens(model, [1] * 126, max_new_tokens=10, eos_token_ids=[]))) == 2
    with pytest.raises(GenerationError, match="context is 128"):
        generate_tokens(model, [1] * 128)
    with pytest.raises(GenerationError, match="at least one prompt token"):
        generate_tokens(model, [])
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": -1}):
        with pytest.raises(GenerationError):
            generate_tokens(model, PROMPT, **bad)


def test_sampling_with_a_seed_is_deterministic():
    model = lively(build_tiny("qwen2"))

    def sample(seed: int) -> list[int]:
        return list(generate_tokens(model, PROMPT, max_new_tokens=20, temperature=1.5, top_p=0.95,
                                    eos_token_ids=[], seed=seed))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is always `probs`."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log(), requires_grad=False)

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        logits = self.logits.expand(1, input_ids.shape[1], -1)
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.3, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})])
def test_nucleus_sampling_draws_only_inside_the_nucleus(top_p, nucleus):
    tokens = list(generate_tokens(FixedLogits(PROBS), [0], max_new_tokens=1000, temperature=1.0, top_p=top_p,
                                  eos_token_ids=[], seed=0))
    assert set(tokens) == nucleus


def test_temperature_reshapes_the_distribution():
    def share_of_top(temperature: float) -> float:
        tokens = list(generate_tokens(FixedLogits(PROBS), [0], max_new_tokens=2000, temperature=temperature,
                                      eos_token_ids=[], seed=1))
        return tokens.count(0) / len(tokens)

    assert share_of_top(1.0) == pytest.approx(0.5, abs=0.04)
    assert share_of_top(0.1) > 0.99
    assert share_of_top(10.0) < 0.3  # near uniform: 0.2 each
    assert set(generate_tokens(FixedLogits(PROBS), [0], max_new_tokens=50, eos_token_ids=[])) == {0}


def test_stream_text_reassembles_multibyte_characters():
    tok = byte_tokenizer()
    text = "héllo → wörld € ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # é, →, ö and € are split into byte tokens
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "é" in pieces[1] and len(pieces) < len(ids)
    cut = ids[:2]  # "h" and half of "é"
    assert "".join(stream_text(tok, cut)) == tok.decode(cut)


def test_generate_text_equals_streamed_text_and_stops_at_end_of_turn():
    tok, model = byte_tokenizer(), byte_model()
    prompt = [{"role": "user", "content": "Hi"}]
    ids = encode_prompt(tok, prompt)
    stops = stop_token_ids(tok)
    tokens = list(generate_tokens(model, ids, max_new_tokens=30, eos_token_ids=stops))
    assert not set(tokens) & set(stops)
    assert generate_text(model, tok, prompt, max_new_tokens=30) == "".join(stream_text(tok, tokens))


def test_prompt_reference_and_encoding_of_records():
    tok = byte_tokenizer()
    chat = Record("x:1", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ])
    assert prompt_messages(chat) == chat.messages[:4] and reference(chat) == "4"
    ids = encode_prompt(tok, prompt_messages(chat))
    assert tok.decode(ids).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids) == tok.apply_chat_template(chat.messages[:4], tokenize=False, add_generation_prompt=True)
    plain = Record("x:2", prompt="Q: 1+1\nA:", completion=" 2")
    assert prompt_messages(plain) == "Q: 1+1\nA:" and reference(plain) == " 2"
    assert encode_prompt(tok, prompt_messages(plain)) == tok("Q: 1+1\nA:")["input_ids"]
    text = Record("x:3", completion="just text", train_on_prompt=True)
    with pytest.raises(DataError, match="x:3.*no prompt"):
        prompt_messages(text)
    with pytest.raises(DataError, match="x:3"):
        reference(text)


def test_stop_token_ids():
    tok = byte_tokenizer()
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    tok.eos_token = "<|endoftext|>"
    assert stop_token_ids(tok) == sorted(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


# --------------------------------------------------------------------------- many prompts at once


def forward_inputs(model: nn.Module) -> list[tuple[int, ...]]:
    """Record the input_ids shape of every forward call of `model`."""
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    return shapes


def varied_prompts() -> list[list[int]]:
    """Prompts whose lengths are far from sorted, so batching by length reorders them."""
    lengths = [3, 21, 5, 17, 1, 19, 4]
    rng = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (n,), generator=rng).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_batch_equals_one_prompt_at_a_time_in_the_prompts_order(arch):
    model = lively(build_tiny(arch))
    prompts = varied_prompts()
    alone = [list(generate_tokens(model, p, max_new_tokens=9, eos_token_ids=[])) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # every answer differs, so order shows
    shapes = forward_inputs(model)
    assert greedy_batch(model, prompts, max_new_tokens=9, eos_token_ids=[], batch_size=2) == alone
    # Longest first, two at a time: (21, 19), (17, 5), (4, 3), (1); each batch's prompts once (padded to
    # the longer one), then one token a step with the cache.
    assert shapes[::9] == [(2, 21), (2, 17), (2, 4), (1, 1)] and len(shapes) == 4 * 9
    assert all(s[1] == 1 for i, s in enumerate(shapes) if i % 9)


def test_greedy_batch_stops_when_every_row_has_stopped():
    model = lively(build_tiny("llama"))
    prompts = varied_prompts()[:3]
    alone = [list(generate_tokens(model, p, max_new_tokens=12, eos_token_ids=[])) for p in prompts]
    stop = {alone[0][2], alone[1][4], alone[2][3]}  # each row meets one of these early
    expected = [next((a[:i] for i, t in enumerate(a) if t in stop), a) for a in alone]
    assert all(len(e) < 12 for e in expected)
    shapes = forward_inputs(model)
    assert greedy_batch(model, prompts, max_new_tokens=12, eos_token_ids=stop, batch_size=3) == expected
    assert len(shapes) == max(len(e) for e in expected) + 1  # the step that wrote the last stop token, no more


def test_greedy_batch_context_limit_settings_and_progress():
    model = lively(build_tiny("llama"))  # 128 positions
    calls = []
    out = greedy_batch(model, [[1] * 126, [2] * 5, [3] * 50], max_new_tokens=10, eos_token_ids=[], batch_size=2,
                       on_progress=lambda done, total: calls.append((done, total)))
    assert [len(o) for o in out] == [2, 10, 10]  # a row stops at the end of the context
    assert calls == [(0, 3), (2, 3), (3, 3)]
    with pytest.raises(GenerationError, match="prompt 1 has 128 tokens.*context is 128"):
        greedy_batch(model, [[1], [1] * 128])
    with pytest.raises(GenerationError, match="prompt 0 has no token"):
        greedy_batch(model, [[]])
    with pytest.raises(GenerationError, match="batch_size"):
        greedy_batch(model, [[1]], batch_size=0)
    assert greedy_batch(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_generate_batch_equals_generate_text_on_a_4bit_model_with_lora(tmp_path):
    tok = byte_tokenizer()
    byte_model().save_pretrained(tmp_path / "m")
    model, _ = qlorafit.load_model(tmp_path / "m", quant="nf4")
    with_random_lora(model)
    prompts = [[{"role": "user", "content": "Hello there"}], "The cat", [{"role": "user", "content": "a"}],
               "1 2 3 4 5 6 7 8 9 10"]
    alone = [generate_text(model, tok, p, max_new_tokens=10) for p in prompts]
    assert len(set(alone)) == len(prompts)
    assert generate_batch(model, tok, prompts, max_new_tokens=10, batch_size=3) == alone
    assert sum(isinstance(m, qlorafit.Linear4bit) for m in model.modules()) == 14  # the 4-bit layers are back
