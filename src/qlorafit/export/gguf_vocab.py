"""The tokenizer of a GGUF export: the `tokenizer.*` keys from which llama.cpp rebuilds it.

llama.cpp does not run the Hugging Face tokenizer. It implements a few tokenizer families itself
and picks one, with its settings, from the file's `tokenizer.ggml.*` keys, so the keys must make
it tokenize exactly as the run did: a difference is silent, the model just reads token sequences
it never saw. Where the keys come from:

- A model loaded from a GGUF file already has llama.cpp's keys: they are copied as they are.
- Otherwise they are built from the fast tokenizer's `tokenizer.json`, for the two families
  llama.cpp shares with it:

  * byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): llama.cpp's "gpt2" model. llama.cpp splits
    the text before BPE with regexes of its own, chosen by the name in `tokenizer.ggml.pre`; the
    name is found as llama.cpp's converter finds it, from a hash of the ids the tokenizer gives a
    fixed text (`gguf_pre`); an unknown hash is refused, as the converter refuses it.
  * SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma): llama.cpp's "llama"
    model, which repeatedly merges the adjacent pair whose *result* has the highest score.
    tokenizer.json has ranked merges instead of scores. Scoring each token minus the rank of its
    first merge gives the same merges when every split of a token into two pieces is a merge and
    a token's merges have neighbouring ranks, as in tokenizers converted from SentencePiece; a
    tokenizer where that fails is refused.

  Unigram, WordPiece and other BPE flavours are refused: llama.cpp has no tokenizer that matches.

Everywhere: the chat template is the one the run trained with, and the eos and eot ids name the
end-of-turn token of that template (`<|im_end|>` for ChatML): llama.cpp (and Ollama) stop
generating at those ids, so a fine-tuned chat model stops after its answer rather than running on.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType, TokenType
from transformers.integrations.gguf import reader as hf_gguf_reader

from ..errors import ExportError
from .gguf_pre import llama_cpp_pre

Keys = gguf.Keys.Tokenizer
SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

_Value = tuple[Any, GGUFValueType, GGUFValueType | None]  # what GGUFWriter.add_key_value takes


def add_tokenizer(
    writer: gguf.GGUFWriter,
    tokenizer: Any,
    *,
    chat_template: str | None,
    source_gguf: str | Path | None = None,
    eot_token: str | None = None,
    vocab_size: int | None = None,
) -> None:
    """Add the `tokenizer.*` keys llama.cpp needs to tokenize as `tokenizer` does to `writer`.

    `tokenizer` is the Hugging Face fast tokenizer the run trained with. `source_gguf`, the GGUF
    file the model was loaded from, if any: its tokenizer keys are copied as they are. Otherwise
    the keys are built from `tokenizer` (byte-level BPE or SentencePiece-style BPE). `chat_template`
    becomes `tokenizer.chat_template` (a template in `source_gguf` is dropped). `eot_token`, the
    template's end-of-turn token, becomes both the eos and the eot token. `vocab_size`, the
    model's embedding rows when they outnumber the tokens: the list is padded with unused
    `[PADn]` tokens, as llama.cpp's converter does (llama.cpp wants one token per row).

    Raises ExportError, having added nothing, for a tokenizer llama.cpp would tokenize differently.
    """
    if source_gguf is not None:
        keys = _keys_from_gguf(Path(source_gguf), tokenizer, vocab_size)
    else:
        keys = _keys_from_tokenizer(tokenizer, vocab_size)
    _set_end_of_turn(keys, tokenizer, eot_token)
    if chat_template is not None:
        keys[Keys.CHAT_TEMPLATE] = (chat_template, GGUFValueType.STRING, None)
    for key, (value, vtype, sub_type) in keys.items():
        writer.add_key_value(key, value, vtype, sub_type)


# --------------------------------------------------------------------------------------------
# Copied from the source GGUF file


def _keys_from_gguf(path: Path, tokenizer: Any, vocab_size: int | None) -> dict[str, _Value]:
    """The tokenizer keys of the GGUF file `path`, as they are, but any chat template."""
    try:
        keys = {
            name: value
            for name, value in _read_metadata(path)
            if name.startswith("tokenizer.") and not name.startswith(Keys.CHAT_TEMPLATE)
        }
    except (OSError, ValueError, struct.error) as exc:
        raise ExportError(f"{path}: cannot read the source GGUF file's tokenizer ({exc}). Check the path.") from exc
    if Keys.LIST not in keys:
        raise ExportError(f"{path}: the source GGUF file has no tokenizer ({Keys.LIST}); it cannot be copied.")
    n_tokens = len(keys[Keys.LIST][0])
    if vocab_size is not None and vocab_size != n_tokens:
        raise ExportError(
            f"{path}: the source GGUF file has {n_tokens} tokens but the model has {vocab_size} embedding rows; "
            "llama.cpp needs one token per row. Was the vocabulary resized during training?"
        )
    if len(tokenizer) > n_tokens:
        raise ExportError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens, the source GGUF file only {n_tokens}: tokens were "
            "added during training that a copy of the file's tokenizer would lack."
        )
    return keys


def _read_metadata(path: Path) -> Iterator[tuple[str, _Value]]:
    """Every metadata key of the (little-endian) GGUF file `path` with its value and GGUF types.

    The values are read by transformers' fast GGUF reader (as `models/gguf.py` reads the file),
    which drops the value types; they are read here, key by key, so a copy keeps them. Not
    gguf.GGUFReader, which takes seconds over a vocabulary (it makes arrays for every string).
    """
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    magic, version, _, count = struct.unpack_from("<4sIQQ", blob, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a little-endian GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
    pos = 24
    for _ in range(count):
        name, pos = hf_gguf_reader._read_string(blob, pos)
        vtype = GGUFValueType(struct.unpack_from("<I", blob, pos)[0])
        sub_type = GGUFValueType(struct.unpack_from("<I", blob, pos + 4)[0]) if vtype == GGUFValueType.ARRAY else None
        value, pos = hf_gguf_reader._read_value(blob, pos + 4, vtype, keep_strings=name.startswith("tokenizer."))
        yield name, (value, vtype, sub_type)


# --------------------------------------------------------------------------------------------
# Built from tokenizer.json


def _keys_from_tokenizer(tokenizer: Any, vocab_size: int | None) -> dict[str, _Value]:
    """Every tokenizer key of a byte-level BPE or SentencePiece-style BPE tokenizer, from its tokenizer.json."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"the tokenizer is a {type(tokenizer).__name__}, not a fast tokenizer with a tokenizer.json: its "
            "llama.cpp form cannot be worked out. Load the model with its tokenizer.json (use_fast=True)."
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    sentencepiece = model["type"] == "BPE" and bool(model.get("byte_fallback"))
    byte_level = any(p["type"] == "ByteLevel" for p in _flatten(spec["pre_tokenizer"], "pretokenizers"))
    if model["type"] != "BPE" or not (sentencepiece or byte_level):
        raise _refusal(
            f"the tokenizer is {_describe(spec)}, and llama.cpp reproduces only byte-level BPE (GPT-2, Llama 3, "
            "Qwen2 style) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral style) tokenizers"
        )
    tokens, types = _token_list(model, spec["added_tokens"], sentencepiece, vocab_size)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    keys: dict[str, _Value] = {}
    if sentencepiece:
        prefix = _sentencepiece_space_prefix(spec, tokens)
        scores = _sentencepiece_scores(tokens, types, merges)
        keys[Keys.MODEL] = ("llama", GGUFValueType.STRING, None)
        keys[Keys.PRE] = ("default", GGUFValueType.STRING, None)
        keys[Keys.SCORES] = (scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        keys[Keys.ADD_PREFIX] = (prefix, GGUFValueType.BOOL, None)
    else:
        keys[Keys.PRE] = (llama_cpp_pre(tokenizer), GGUFValueType.STRING, None)
        _check_byte_level(model, merges)
        keys[Keys.MODEL] = ("gpt2", GGUFValueType.STRING, None)
        keys[Keys.MERGES] = ([f"{a} {b}" for a, b in merges], GGUFValueType.ARRAY, GGUFValueType.STRING)
    keys[Keys.LIST] = (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
    keys[Keys.TOKEN_TYPE] = (types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    keys.update(_special_keys(tokenizer))
    return keys


def _describe(spec: dict) -> str:
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    return f"a {spec['model']['type']} model with pre-tokenizer {pre.get('type')} and normalizer {normalizer.get('type')}"


def _token_list(
    model: dict, added_tokens: list[dict], sentencepiece: bool, vocab_size: int | None
) -> tuple[list[str], list[int]]:
    """(token texts, llama.cpp token types) by id, added tokens included, gaps as unused `[PADn]`."""
    texts: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: int(TokenType.BYTE if sentencepiece and _BYTE_TOKEN.fullmatch(t) else TokenType.NORMAL)
             for i, t in texts.items()}  # fmt: skip
    stripping = [a["content"] for a in added_tokens if a.get("lstrip") or a.get("rstrip") or a.get("single_word")]
    if stripping:
        raise _refusal(
            f"the tokenizer's added tokens {stripping[:5]} strip the whitespace around them or match whole words "
            "only (lstrip, rstrip, single_word), where llama.cpp matches added tokens as plain text"
        )
    for added in added_tokens:
        text, normal = added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
        if sentencepiece and normal == TokenType.USER_DEFINED and added.get("normalized"):
            text = text.replace(SPACE, " ")  # llama.cpp matches user tokens in the text before escaping spaces
        texts[added["id"]], types[added["id"]] = text, int(normal)
    if sentencepiece and model.get("unk_token") in model["vocab"]:
        types[model["vocab"][model["unk_token"]]] = int(TokenType.UNKNOWN)
    count = max(texts) + 1
    if vocab_size is not None and vocab_size < count:
        raise ExportError(
            f"the tokenizer has ids up to {count - 1} but the model only {vocab_size} embedding rows: they do not "
            "belong together. Export with the tokenizer the model was trained with."
        )
    count = vocab_size or count
    tokens = [texts.get(i, f"[PAD{i}]") for i in range(count)]
    if len(set(tokens)) != count:
        seen: set[str] = set()
        twice = [t for t in tokens if t in seen or seen.add(t)]
        raise _refusal(f"the tokenizer has the tokens {twice[:5]} under two ids each, which llama.cpp cannot load")
    return tokens, [types.get(i, int(TokenType.UNUSED)) for i in range(count)]


def _check_byte_level(model: dict, merges: Sequence[tuple[str, ...]]) -> None:
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _refusal(
            "the byte-level BPE tokenizer marks word pieces with a prefix or suffix "
            f"({model.get('continuing_subword_prefix')!r}, {model.get('end_of_word_suffix')!r}), which llama.cpp does not"
        )
    if not merges:
        raise _refusal("the byte-level BPE tokenizer has no merges, and llama.cpp needs some (GGUF cannot store none)")
    bad = [m for m in merges if len(m) != 2 or " " in m[0] or " " in m[1]]
    if bad:
        raise _refusal(f"the tokenizer has merges {bad[:3]} whose parts contain a space, which GGUF cannot store")


# --------------------------------------------------------------------------------------------
# SentencePiece-style BPE


def _sentencepiece_space_prefix(spec: dict, tokens: list[str]) -> bool:
    """Whether llama.cpp must put a space before the text (`add_space_prefix`), after checking that
    the tokenizer treats spaces as llama.cpp's SentencePiece tokenizer does.

    llama.cpp writes every space as "▁", normalizes nothing else, and with `add_space_prefix`
    puts one more before every piece of text between special tokens, even one that starts with a
    space. transformers' legacy Llama tokenizer.json does the same (a Prepend normalizer); a
    Metaspace pre-tokenizer that prepends skips texts that start with a space (and, with
    prepend_scheme "first", every text but the first), so it is refused.
    """
    replaced = prepended = False
    for n in _flatten(spec.get("normalizer"), "normalizers"):
        if n["type"] == "Replace" and n["pattern"].get("String") == " " and n["content"] == SPACE:
            replaced = True
        elif n["type"] == "Prepend" and n["prepend"] == SPACE:
            prepended = True
        else:
            raise _spm_error(f"its normalizer {n['type']} ({n}) changes the text, which llama.cpp does not")
    metaspace = None
    for p in _flatten(spec.get("pre_tokenizer"), "pretokenizers"):
        if p["type"] == "Metaspace" and p.get("replacement", SPACE) == SPACE:
            metaspace = p
        elif not (p["type"] == "Split" and p["pattern"].get("String") == " " and replaced):  # Gemma's, a no-op
            raise _spm_error(f"its pre-tokenizer {p['type']} ({p}) splits the text, which llama.cpp does not")
    if metaspace is None:
        if not replaced:
            raise _spm_error("it keeps spaces as they are, where llama.cpp writes them as '▁'")
        return prepended
    scheme = metaspace.get("prepend_scheme") or ("always" if metaspace.get("add_prefix_space", True) else "never")
    if scheme != "never":
        raise _spm_error(
            f"its Metaspace pre-tokenizer (prepend_scheme {scheme!r}) adds '▁' before a text only if it does not "
            "start with a space" + (", and only before the first text" if scheme == "first" else "")
            + ", where llama.cpp adds one before every text and after every special token (' hi' becomes "
            "'▁▁hi', '<|im_start|>user' '<|im_start|>▁user'); a tokenizer.json saved with transformers' "
            "legacy=True (a Prepend normalizer) matches llama.cpp"
        )
    inner = [t for t in tokens if SPACE in t[1:]] if metaspace.get("split", True) else []
    if inner:
        raise _spm_error(
            f"its Metaspace pre-tokenizer splits the text before each space, but tokens such as {inner[:3]} "
            "span one, and llama.cpp would produce them"
        )
    return prepended


def _flatten(component: dict | None, children: str) -> list[dict]:
    if not component:
        return []
    if component["type"] == "Sequence":
        return [leaf for child in component[children] for leaf in _flatten(child, children)]
    return [component]


def _spm_error(why: str) -> ExportError:
    return _refusal(f"the SentencePiece-style tokenizer cannot be written for llama.cpp: {why}")


def _refusal(what: str) -> ExportError:
    return ExportError(
        f"{what}. llama.cpp would tokenize differently from training, so no GGUF file was written; export the "
        "LoRA adapter or the merged model in Hugging Face format instead."
    )


def _sentencepiece_scores(tokens: list[str], types: list[int], merges: Sequence[tuple[str, ...]]) -> list[float]:
    """A score per token from which llama.cpp's highest-score-first merging repeats the BPE merges.

    llama.cpp merges any adjacent pair whose concatenation is a token, best score first; the BPE
    merges only listed pairs, lowest rank first. Scoring a token minus its first merge's rank makes
    the two agree when (1) every split of a token into two pieces llama.cpp can hold (tokens, or
    single characters) is a merge, and (2) the merges that make one token have neighbouring ranks.
    """
    known = set(tokens)
    missing_bytes = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in known]
    if missing_bytes:
        raise _spm_error(f"it lacks the byte tokens {missing_bytes[:4]}, which llama.cpp's byte fallback needs")
    pairs = set(merges)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    count: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
        last[left + right] = rank
        count[left + right] = count.get(left + right, 0) + 1
    scattered = [t for t in first if last[t] - first[t] + 1 != count[t]]
    if scattered:
        raise _spm_error(f"the merges that make the tokens {scattered[:3]} have ranks far apart")
    unlisted = [
        (text[:i], text[i:])
        for text, kind in zip(tokens, types, strict=True)
        if kind in (TokenType.NORMAL, TokenType.BYTE)  # added tokens are matched in the text before any merging
        for i in range(1, len(text))
        if (i == 1 or text[:i] in known) and (i == len(text) - 1 or text[i:] in known) and (text[:i], text[i:]) not in pairs
    ]
    if unlisted:
        raise _spm_error(f"the pairs {unlisted[:3]} make tokens but are no merges; llama.cpp would merge them")
    return [-float(first[t]) if t in first else 0.0 for t in tokens]


# --------------------------------------------------------------------------------------------
# Special tokens


def _special_keys(tokenizer: Any) -> dict[str, _Value]:
    """bos, eos, unk, sep and pad ids, and whether bos/eos are added to every text, from the tokenizer."""
    keys: dict[str, _Value] = {}
    for key, name in ((Keys.BOS_ID, "bos"), (Keys.EOS_ID, "eos"), (Keys.UNK_ID, "unk"), (Keys.SEP_ID, "sep"),
                      (Keys.PAD_ID, "pad")):  # fmt: skip
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            keys[key] = (int(token_id), GGUFValueType.UINT32, None)
    add_bos, add_eos = added_bos_eos(tokenizer)
    keys[Keys.ADD_BOS] = (add_bos, GGUFValueType.BOOL, None)
    keys[Keys.ADD_EOS] = (add_eos, GGUFValueType.BOOL, None)
    return keys


def added_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts bos before and eos after every text: the only additions llama.cpp makes."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    start = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), None)
    before, after = (full[:start], full[start + len(plain) :]) if start is not None else (full, [])
    if before not in ([], [tokenizer.bos_token_id]) or after not in ([], [tokenizer.eos_token_id]):
        raise _refusal(
            f"the tokenizer adds the tokens {before} before and {after} after every text, where llama.cpp can only "
            "add the bos token before and the eos token after"
        )
    return bool(before), bool(after)


def _set_end_of_turn(keys: dict[str, _Value], tokenizer: Any, eot_token: str | None) -> None:
    """Point the eos and eot ids at the chat template's end-of-turn token."""
    if eot_token is None:
        return
    try:
        eot_id = keys[Keys.LIST][0].index(eot_token)
    except ValueError:
        raise ExportError(
            f"the chat template's end-of-turn token {eot_token!r} is not in the tokenizer's vocabulary, so "
            "llama.cpp could not stop generating at it. Check the chat template and the tokenizer."
        ) from None
    trained_id = tokenizer.convert_tokens_to_ids(eot_token)
    if trained_id is not None and trained_id != tokenizer.unk_token_id and trained_id != eot_id:
        raise ExportError(
            f"the end-of-turn token {eot_token!r} has id {trained_id} in the tokenizer but {eot_id} in the GGUF "
            "tokenizer; the exported model would stop at the wrong token."
        )
    add_eos = keys.get(Keys.ADD_EOS, (False,))[0]
    old_eos = keys.get(Keys.EOS_ID, (None,))[0]
    if add_eos and old_eos != eot_id:
        raise ExportError(
            f"the tokenizer adds its eos token (id {old_eos}) to every text, and the end-of-turn token "
            f"{eot_token!r} (id {eot_id}) must become llama.cpp's eos so generation stops after an answer; "
            "llama.cpp would then add the end-of-turn token to every prompt instead."
        )
    keys[Keys.EOS_ID] = (eot_id, GGUFValueType.UINT32, None)
    keys[Keys.EOT_ID] = (eot_id, GGUFValueType.UINT32, None)
