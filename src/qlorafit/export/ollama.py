"""An Ollama Modelfile beside an exported GGUF, so `ollama create NAME -f folder/Modelfile` just works.

The Modelfile names the model (FROM, and ADAPTER for a LoRA GGUF over its base), carries the chat
template the run trained with as a Go template (export/ollama_template.py), the stop strings that
end an assistant turn, and optional generation parameters and system prompt.

Ollama's Modelfile has no escapes (parser/parser.go): a value is `"..."`, `\"\"\"...\"\"\"` or the
rest of the line, and a `\"\"\"` block ends at the first line break where the text so far, less
trailing white space, ends with three quotes; characters Go does not print are dropped. So every
value is checked against those rules before it is written. The template never needs this (its
awkward literals become Go string constants); a system prompt that a `\"\"\"` block cannot carry
(a line ending in three quotes, say) is put into the template instead, as the default system prompt
of conversations that bring none, which is what Ollama does with SYSTEM.

The runtime puts the bos token before every prompt when the tokenizer does (the GGUF export
records that as `tokenizer.ggml.add_bos_token`), so for such tokenizers the template leaves out
the bos string its Jinja original writes first; otherwise the model would see two.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ExportError
from .files import write_file
from .gguf_vocab import added_bos_eos
from .ollama_template import ChatPieces, derive_pieces, effective_chat_template, go_template

_NAME = re.compile(r"[A-Za-z0-9_]+")


def write_modelfile(
    folder: Path,
    gguf_file: Path,
    tokenizer,
    *,
    chat_template: str | None = None,
    system: str | None = None,
    adapter_file: Path | None = None,
    parameters: dict | None = None,
) -> Path:
    """Write `folder/Modelfile` for `gguf_file` (the base model's GGUF when `adapter_file` is given).

    `chat_template` is the template the run trained with (default: the tokenizer's, else
    qlorafit's fallback); `parameters` are Ollama PARAMETERs (a list value gives one line per
    item, e.g. extra stop strings). Paths inside `folder` are written relative to it.
    """
    folder = Path(folder)
    pieces, system_line = modelfile_template(tokenizer, chat_template, system)
    lines = [f"FROM {_path(gguf_file, folder, 'gguf_file')}"]
    if adapter_file is not None:
        lines.append(f"ADAPTER {_path(adapter_file, folder, 'adapter_file')}")
    lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    lines += _parameter_lines(pieces.end_of_turn, parameters or {})
    if system_line is not None:
        lines.append(system_line)
    text = "\n".join(lines) + "\n"
    return write_file(folder / "Modelfile", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def modelfile_template(tokenizer, chat_template: str | None = None,
                       system: str | None = None) -> tuple[ChatPieces, str | None]:
    """The chat template's pieces for the Modelfile's TEMPLATE and its SYSTEM line (or None).

    Raises ExportError for a template Ollama cannot express or a system prompt it has no place for;
    callers about to write a GGUF file first can ask before that work.
    """
    pieces = derive_pieces(tokenizer, effective_chat_template(tokenizer, chat_template))
    if added_bos_eos(tokenizer)[0]:  # llama.cpp adds it to every prompt, as the GGUF export tells it to
        pieces = pieces.without_bos(tokenizer.bos_token)
    if system is None:
        return pieces, None
    defaulted = pieces.with_default_system(system)  # raises where the template has no place for one
    if _block_ok(system):
        return pieces, f'SYSTEM """{system}"""'
    return defaulted, None


def _path(path: Path, folder: Path, what: str) -> str:
    """`./name` inside the folder (Ollama resolves it against the Modelfile's folder), else absolute."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{what} {path} does not exist: write the GGUF file before the Modelfile")
    absolute = path.resolve()
    try:
        text = "./" + absolute.relative_to(folder.resolve()).as_posix()
    except ValueError:
        text = str(absolute)
    if not _line_ok(text) or text != text.strip() or text.startswith('"'):
        raise ExportError(f"{what} {text!r} cannot be written in a Modelfile line: rename it (no line breaks, quotes first or spaces at the end)")
    return text


def _line_ok(text: str) -> bool:
    """Whether Ollama's parser keeps every character of `text` on one line."""
    return all(c.isprintable() or c == "\t" for c in text)


def _block_ok(text: str) -> bool:
    """Whether `\"\"\"text\"\"\"` reads back as `text` (see the module docstring)."""
    if not all(c.isprintable() or c in "\n\t" for c in text):
        return False
    return not any(c == "\n" and text[:i].rstrip().endswith('"""') for i, c in enumerate(text))


def _quote(value: str, what: str) -> str:
    if _line_ok(value) and not value.startswith('""'):  # '"""...' would open a block
        return f'"{value}"'
    if _block_ok(value):
        return f'"""{value}"""'
    raise ExportError(f"{what} {value!r} cannot be written in a Modelfile (it has characters Ollama drops or a line ending in quotes)")


def _value(value, what: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _quote(value, what)
    raise ExportError(f"{what} is a {type(value).__name__}: give a number, a string, a bool or a list of them")


def _parameter_lines(stops: tuple[str, ...], parameters: dict) -> list[str]:
    """PARAMETER lines: the template's stop strings, then the given ones (stops not repeated)."""
    bad = [str(name) for name in parameters if not _NAME.fullmatch(str(name))]
    if bad:
        raise ExportError(f"Ollama parameter names are letters, digits and _; not {', '.join(map(repr, bad))}")
    seen, lines = set(), []
    extra = parameters.get("stop", [])
    for stop in [*stops, *(extra if isinstance(extra, list | tuple) else [extra])]:
        if stop not in seen:
            seen.add(stop)
            lines.append(f"PARAMETER stop {_value(stop, 'stop string')}")
    for name, value in parameters.items():
        if name == "stop":
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            lines.append(f"PARAMETER {name} {_value(item, f'parameter {name}')}")
    return lines
