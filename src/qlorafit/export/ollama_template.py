"""A Hugging Face chat template (Jinja) as an Ollama template (Go text/template), found by probing.

Jinja is a programming language and cannot be translated statement by statement into Go's
text/template with Ollama's few variables. What a chat template does to a conversation can be
measured, though: it is rendered on conversations whose contents are sentinel words, and the text
around the sentinels is each role's prefix and suffix, the generation prompt, what comes before
the first message (a bos string, a default system turn) and where a system prompt goes: its own
turn, folded into the first user message (Llama-2, Gemma 3) or into the last one (Mistral v3),
or nowhere (the template raises or drops it). Those pieces (ChatPieces) are then written as a
Go template that loops over `.Messages`, and the pieces are checked by rendering them again on
other conversations (one to five turns, with and without a system prompt) and comparing with the
Jinja rendering, character for character. A template whose output depends on the conversation in
any other way (message counts, content tests) fails that check and is refused with ExportError.

Ollama differs from `apply_chat_template` in two ways this module follows: the generation prompt
is added whenever the last message is not the assistant's, and a last assistant message is left
open (no end-of-turn after it) so the model continues it. Templates that trim message content
(`| trim`, `.strip()`) are matched on content without surrounding whitespace; Go templates have no
trim, so Ollama passes such whitespace through. Text a template computes when it renders (Llama
3.2's "Today Date") is measured at export and stays fixed in the Ollama template.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.render import fallback_chat_template
from ..errors import DataError, ExportError

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
_S1, _S2, _U1, _U2, _A1 = "QLFSYSONE", "QLFSYSTWO", "QLFUSERONE", "QLFUSERTWO", "QLFASSISTONE"
# Contents for the check: line breaks, quotes and template syntax, no surrounding whitespace.
_TEXTS = ("Hello there!", 'Two lines,\n"quoted" and {{ .Content }}', "Ok.", "Why?\n\nBecause {% x %}.", "Sure")
_SUGGEST = (
    "pass a template of the same format that Ollama can express as chat_template (--chat-template), "
    "or write the Modelfile's TEMPLATE by hand"
)


@dataclass(frozen=True)
class ChatPieces:
    """What a chat template writes around each message, as measured by `derive_pieces`."""

    start: str
    """Before the first message when it is not a system message: a bos string, a default system turn."""
    start_system: str
    """Before a leading system message's content (fold and none modes: before the first user turn)."""
    prefix: dict[str, str]
    """Role -> text before the content; `system` only in "turn" mode (a system message after the first)."""
    suffix: dict[str, str]
    """Role -> text after the content; an assistant message that ends the conversation has none."""
    generation: str
    """After the last message when it is not the assistant's."""
    system: str = "turn"
    """How a system message is written: "turn" (its own turn, also after the first message), "turn-first"
    (only as the first one), "first-user" / "last-user" (folded into that user message), "none"."""
    fold: tuple[str, str] = ("", "")
    """Fold modes: text before and after the system prompt inside the user message."""
    default_fold: str | None = None
    """Fold modes: a system prompt to fold in when the conversation has none (see `with_default_system`)."""
    end_of_turn: tuple[str, ...] = ()
    """The strings that end an assistant turn (stop strings for generation)."""
    opening_user: str | None = None
    """The prefix of a user message that opens the prompt, when it differs (see `without_bos`)."""

    def with_default_system(self, text: str) -> ChatPieces:
        """These pieces with `text` as the system prompt of conversations that start without one."""
        if self.system == "none":
            raise ExportError(f"the chat template has no place for a system prompt, so {text[:40]!r} cannot be used; {_SUGGEST}")
        if self.system in ("turn", "turn-first"):
            return dataclasses.replace(self, start=self.start_system + text + self.suffix[SYSTEM])
        return dataclasses.replace(self, start=self.start_system, default_fold=text)

    def without_bos(self, bos: str) -> ChatPieces:
        """These pieces less the `bos` string that opens the prompt: for a runtime that adds it itself.

        llama.cpp and Ollama put the bos token before every prompt when the GGUF says the tokenizer
        does (`tokenizer.ggml.add_bos_token`); a template that writes it too would give two.
        """
        cut = dataclasses.replace(
            self, start=self.start.removeprefix(bos), start_system=self.start_system.removeprefix(bos)
        )
        if not self.start and self.prefix[USER].startswith(bos):  # bos opens each user turn (Llama-2)
            cut = dataclasses.replace(cut, opening_user=self.prefix[USER].removeprefix(bos))
        return cut

    @property
    def _system_writes_nothing(self) -> bool:
        return self.system not in ("turn", "turn-first") and not self.start_system


def render_pieces(p: ChatPieces, messages: list[dict]) -> str:
    """The prompt Ollama builds from `messages` with the Go template of `p` (same logic, in Python)."""
    out: list[str] = []
    lead = bool(messages) and messages[0]["role"] == SYSTEM
    for i, m in enumerate(messages):
        role, content, last = m["role"], m["content"], i == len(messages) - 1
        if role == SYSTEM:
            if p.system == "turn":
                out += [p.start_system if i == 0 else p.prefix[SYSTEM], content, p.suffix[SYSTEM]]
            elif i == 0:
                out += [p.start_system, content, p.suffix[SYSTEM]] if p.system == "turn-first" else [p.start_system]
        elif role in (USER, ASSISTANT):
            opening = i == 0 or i == 1 and lead and p._system_writes_nothing
            use_opening = role == USER and opening and p.opening_user is not None
            out += [p.start if i == 0 else "", p.opening_user if use_opening else p.prefix[role]]
            if role == USER:
                out.append(_fold(p, messages, i, lead, last))
            out.append(content)
            if role == USER or not last:
                out.append(p.suffix[role])
        if last and role != ASSISTANT:
            out.append(p.generation)
    return "".join(out)


def _fold(p: ChatPieces, messages: list[dict], i: int, lead: bool, last: bool) -> str:
    before, after = p.fold
    if p.system == "first-user" and i == 1 and lead or p.system == "last-user" and last and lead:
        return before + messages[0]["content"] + after
    if p.default_fold is not None and (p.system == "first-user" and i == 0 or p.system == "last-user" and last):
        return before + p.default_fold + after
    return ""


# ---- the Go template ------------------------------------------------------------------------


def go_template(p: ChatPieces) -> str:
    """`p` as an Ollama template over `.Messages`; `render_pieces` is what it renders."""
    first = _when("eq $i 0", _lit(p.start))
    if p.system == "turn":
        if p.start_system == p.prefix[SYSTEM]:
            system = [_lit(p.prefix[SYSTEM])]
        else:
            system = [_act("if eq $i 0"), _lit(p.start_system), _act("else"), _lit(p.prefix[SYSTEM]), _act("end")]
        system += [_act(".Content"), _lit(p.suffix[SYSTEM])]
    elif p.system == "turn-first":
        system = _when("eq $i 0", _lit(p.start_system), _act(".Content"), _lit(p.suffix[SYSTEM]))
    else:
        system = _when("eq $i 0", _lit(p.start_system))
    parts = [
        _act("range $i, $_ := .Messages"),
        _act("$last := eq (len (slice $.Messages $i)) 1"),
        _act('if eq .Role "system"'), *system,
        _act('else if eq .Role "user"'), *first, *_go_user_prefix(p), *_go_fold(p), _act(".Content"), _lit(p.suffix[USER]),
        _act('else if eq .Role "assistant"'), *first, _lit(p.prefix[ASSISTANT]), _act(".Content"),
        *_when("not $last", _lit(p.suffix[ASSISTANT])),
        _act("end"),
        *_when('and $last (ne .Role "assistant")', _lit(p.generation)),
        _act("end"),
    ]
    return _join(parts)


def _go_user_prefix(p: ChatPieces) -> list[tuple[str, str]]:
    if p.opening_user is None:
        return [_lit(p.prefix[USER])]
    opening = 'or (eq $i 0) (and (eq $i 1) (eq (index $.Messages 0).Role "system"))'
    opening = opening if p._system_writes_nothing else "eq $i 0"
    return [_act(f"if {opening}"), _lit(p.opening_user), _act("else"), _lit(p.prefix[USER]), _act("end")]


def _go_fold(p: ChatPieces) -> list[tuple[str, str]]:
    if p.system not in ("first-user", "last-user"):
        return []
    before, after = p.fold
    lead = '(eq (index $.Messages 0).Role "system")'
    folded = [_lit(before), _act("(index $.Messages 0).Content"), _lit(after)]
    where = "(eq $i 1)" if p.system == "first-user" else "$last"
    if p.default_fold is None:
        return [_act(f"if and {where} {lead}"), *folded, _act("end")]
    default = [_lit(before + p.default_fold + after)]
    if p.system == "first-user":
        return [_act(f"if and {where} {lead}"), *folded, _act("else if eq $i 0"), *default, _act("end")]
    return [_act("if $last"), _act(f"if {lead}"), *folded, _act("else"), *default, _act("end"), _act("end")]


def _lit(text: str) -> tuple[str, str]:
    return ("lit", text)


def _act(code: str) -> tuple[str, str]:
    return ("act", code)


def _when(condition: str, *body: tuple[str, str]) -> list[tuple[str, str]]:
    """`{{ if condition }}body{{ end }}`, or nothing when the body writes nothing."""
    if all(kind == "lit" and not text for kind, text in body):
        return []
    return [_act(f"if {condition}"), *body, _act("end")]


def _join(parts: list[tuple[str, str]]) -> str:
    """Literal text as it is; actions on their own lines with `{{-` trimming only our line breaks.

    An action right after literal text is written without a line break or trim marker, since
    `{{-` would also eat whitespace the literal needs. Literals that text/template or the
    Modelfile cannot carry as they are become Go string constants.
    """
    merged: list[tuple[str, str]] = []
    for kind, text in parts:  # adjacent literals as one: quotes may meet across them
        if kind == "lit" and merged and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    out, prev = [], None
    for kind, text in merged:
        if kind == "lit":
            if not text:
                continue
            if _plain(text):
                out.append(text)
                prev = "lit"
                continue
            text = go_string(text)
        out.append("{{ " + text + " }}" if prev == "lit" else ("\n" if prev else "") + "{{- " + text + " }}")
        prev = "act"
    return "".join(out)


def _plain(text: str) -> bool:
    """Whether `text` can stand as template text inside a Modelfile \"\"\" block."""
    return "{{" not in text and '"""' not in text and all(c.isprintable() or c in "\n\t" for c in text)


def go_string(text: str) -> str:
    """A Go string constant (interpreted, double-quoted) holding `text`."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif not c.isprintable():
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


# ---- probing the Jinja template -------------------------------------------------------------


def effective_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """The template a run trained with: `chat_template`, the tokenizer's, or qlorafit's fallback."""
    if chat_template:
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template
    try:
        return fallback_chat_template(tokenizer)
    except DataError as e:
        raise ExportError(str(e)) from e


def _jinja(tokenizer, template: str, messages: list[dict], generation: bool, errors: list | None = None) -> str | None:
    """The template's rendering, or None when it refuses the conversation (the error goes to `errors`)."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # noqa: BLE001 - any failure means "this template does not take this conversation"
        if errors is not None:
            errors.append(e)
        return None


def _msgs(*contents: str) -> list[dict]:
    role = {"QLFSYS": SYSTEM, "QLFUSE": USER, "QLFASS": ASSISTANT}
    return [{"role": role[c[:6]], "content": c} for c in contents]


def _split(text: str | None, sentinels: tuple[str, ...]) -> list[str] | None:
    """The text around each sentinel, or None unless each occurs once and in this order."""
    if text is None:
        return None
    pieces, pos = [], 0
    for s in sentinels:
        at = text.find(s)
        if text.count(s) != 1 or at < pos:
            return None
        pieces.append(text[pos:at])
        pos = at + len(s)
    return [*pieces, text[pos:]]


def _special_tokens(tokenizer) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    tokens |= set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _first_token(text: str, specials: list[str]) -> str | None:
    """The special token that occurs first in `text` (the longest one where several start there)."""
    found = [(text.find(t), -len(t), t) for t in specials if t in text]
    return min(found)[2] if found else None


def _turn_end(text: str, specials: list[str]) -> str:
    """`text` up to its first special token and the whitespace after it: a turn's suffix."""
    token = _first_token(text, specials)
    if token is None:
        return text[: len(text) - len(text.lstrip())]
    end = text.find(token) + len(token)
    return text[: end + len(text[end:]) - len(text[end:].lstrip())]


def _suffix(rendered_end: str | None, follows: list[str], specials: list[str]) -> str:
    """Where a role's suffix ends and the next piece starts, in texts that follow its content.

    The text after the message when nothing follows (no generation prompt) when every one of
    `follows` starts with it; else up to the first special token; else nothing. Any split
    renders the same; these keep the end-of-turn token with the turn it ends.
    """
    for candidate in (rendered_end, _turn_end(follows[0], specials)):
        if candidate is not None and all(t.startswith(candidate) for t in follows):
            return candidate
    return ""


def derive_pieces(tokenizer, template: str) -> ChatPieces:
    """Measure `template` on sentinel conversations, then check the pieces on others.

    Raises ExportError naming what does not fit when the template cannot be expressed.
    """
    specials = _special_tokens(tokenizer)

    def render(*contents: str, generation: bool = True, errors: list | None = None) -> str | None:
        return _jinja(tokenizer, template, _msgs(*contents), generation, errors)

    errors: list[Exception] = []
    core = _split(render(_U1, _A1, _U2, errors=errors), (_U1, _A1, _U2))
    if core is None:
        why = f"refuses it ({errors[0]})" if errors else "does not write each message once and in order"
        raise ExportError(
            f"the chat template {why} on a user, assistant, user conversation, so its pieces cannot be "
            f"measured; {_SUGGEST}"
        )
    before, t_ua, t_au, g_u = core
    end_u = (_split(render(_U1, generation=False), (_U1,)) or [None])[-1]
    end_a = (_split(render(_U1, _A1, generation=False), (_U1, _A1)) or [None])[-1]
    s_user = _suffix(end_u, [t_ua, g_u], specials)
    s_assistant = _suffix(end_a, [t_au], specials)
    prefix = {USER: t_au[len(s_assistant):], ASSISTANT: t_ua[len(s_user):]}
    if not before.endswith(prefix[USER]):
        raise ExportError(
            f"the chat template starts the first user message with {before!r} but later ones with {prefix[USER]!r} "
            f"in a way that is not a fixed text before the conversation; {_SUGGEST}"
        )
    start = before[: len(before) - len(prefix[USER])]
    pieces = ChatPieces(
        start=start, start_system=start, prefix=prefix, suffix={USER: s_user, ASSISTANT: s_assistant, SYSTEM: ""},
        generation=g_u[len(s_user):], system="none", end_of_turn=_end_of_turn(tokenizer, t_au, specials),
    )
    pieces = _system_pieces(pieces, render)
    _check(pieces, tokenizer, template)
    return pieces


def _end_of_turn(tokenizer, t_au: str, specials: list[str]) -> tuple[str, ...]:
    """Stop strings: the token that ends an assistant turn (else the text of the next turn's header), and eos."""
    token = _first_token(t_au, specials) or next((line.strip() for line in t_au.splitlines() if line.strip()), "")
    stops = [token] if token else []
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return tuple(stops)


def _system_pieces(p: ChatPieces, render) -> ChatPieces:
    """Where a system prompt goes: measured on system, user, assistant, user."""
    text = render(_S1, _U1, _A1, _U2)
    if text is None or _S1 not in text:
        return p  # the template refuses or drops system messages
    prefix_u, suffix_a = p.prefix[USER], p.suffix[ASSISTANT]
    if (first := _split(text, (_S1, _U1, _A1, _U2))) is not None:
        pre_s, t_su = first[0], first[1]
        if t_su.endswith(prefix_u):  # a turn of its own
            suffix_s = t_su[: len(t_su) - len(prefix_u)]
            mid = _split(render(_U1, _A1, _S2, _U2), (_U1, _A1, _S2, _U2))
            if mid is not None and mid[2].startswith(suffix_a) and mid[3] == suffix_s + prefix_u:
                prefix = {**p.prefix, SYSTEM: mid[2][len(suffix_a):]}
                return dataclasses.replace(p, system="turn", start_system=pre_s, prefix=prefix,
                                           suffix={**p.suffix, SYSTEM: suffix_s})
            return dataclasses.replace(p, system="turn-first", start_system=pre_s, suffix={**p.suffix, SYSTEM: suffix_s})
        if pre_s.startswith(p.start + prefix_u):  # inside the first user message
            return dataclasses.replace(p, system="first-user", fold=(pre_s[len(p.start + prefix_u):], t_su))
    elif (last := _split(text, (_U1, _A1, _S1, _U2))) is not None:
        head = suffix_a + prefix_u
        if last[0].endswith(prefix_u) and last[2].startswith(head):  # inside the last user message
            start_system = last[0][: len(last[0]) - len(prefix_u)]
            return dataclasses.replace(p, system="last-user", start_system=start_system,
                                       fold=(last[2][len(head):], last[3]))
    raise ExportError(
        "the chat template puts the system prompt where a Go template over Ollama's messages cannot "
        f"(rendered: {text!r}); {_SUGGEST}"
    )


def _conversations(p: ChatPieces) -> list[list[dict]]:
    """Conversations to check the pieces on: one to five alternating turns, with the system prompts."""
    roles = [USER, ASSISTANT] * 3
    plain = [[{"role": roles[i], "content": _TEXTS[i]} for i in range(n)] for n in range(1, 6)]
    system = {"role": SYSTEM, "content": "Be brief.\nAnswer in \"English\"."}
    convs = plain + [[system, *c] for c in plain] + [[system]]
    if p.system == "turn":
        convs += [c[:2] + [system] + c[2:] for c in plain[2:]]
    return convs


def _expected(tokenizer, template: str, messages: list[dict]) -> str | None:
    """Jinja's rendering as Ollama prompts: a last assistant message is left open."""
    if messages[-1]["role"] != ASSISTANT:
        return _jinja(tokenizer, template, messages, True)
    text = _jinja(tokenizer, template, messages, False)
    if text is None:
        return None
    at = text.rfind(messages[-1]["content"])
    return text[: at + len(messages[-1]["content"])] if at >= 0 else text


def _check(p: ChatPieces, tokenizer, template: str) -> None:
    for messages in _conversations(p):
        expected = _expected(tokenizer, template, messages)
        if expected is None:
            if any(m["role"] == SYSTEM for m in messages):
                continue  # the template refuses this use of a system message; Ollama's prompt is ours to choose
            raise ExportError(f"the chat template refuses a plain conversation ({_roles(messages)}); {_SUGGEST}")
        got = render_pieces(p, messages)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
            raise ExportError(
                f"the chat template writes the conversation {_roles(messages)} in a way that depends on more than "
                f"each message's role (system prompt: {p.system}): at character {at} it writes "
                f"{expected[at:at + 40]!r} where fixed pieces would give {got[at:at + 40]!r}; {_SUGGEST}"
            )


def _roles(messages: list[dict]) -> str:
    return ", ".join(m["role"] for m in messages)
