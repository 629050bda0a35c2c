"""A small renderer for the subset of Go's text/template that Ollama templates use, for tests.

There is no Go toolchain or Ollama here, so the templates qlorafit writes are checked with this:
text and actions with `{{-` / `-}}` trimming (all adjacent spaces, tabs, carriage returns and
newlines, as Go defines it), if / else if / else / end, range (with `$i, $x :=` and else),
variables (`:=` declares until the enclosing end, `=` assigns an outer one, `$` is the data),
fields (`.Role`, `$.Messages`, `(pipeline).Field`), string (Go escapes), raw string, number and
bool constants, pipes, and the functions eq, ne, and, or, not, len, slice, index. Like Go, `and`
and `or` stop at the first argument that decides them. Data are dicts (fields are keys), lists,
strings, numbers and bools. Anything else raises GoTemplateError, so a template that strays
out of this subset fails the tests rather than passing by accident.
"""

from __future__ import annotations

import re

_WS = " \t\r\n"


class GoTemplateError(Exception):
    pass


# ---- lexing: text and actions ---------------------------------------------------------------


def _lex(src: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_WS)
        if start < 0:
            out.append(("text", text))
            return out
        body_start = start + 2
        if src.startswith("-", body_start) and src[body_start + 1: body_start + 2] in tuple(_WS):
            text = text.rstrip(_WS)
            body_start += 2
        out.append(("text", text))
        end = _action_end(src, body_start)
        body = src[body_start:end]
        trim_next = len(body) >= 2 and body.endswith("-") and body[-2] in _WS
        if trim_next:
            body = body[:-1]
        out.append(("action", body.strip(_WS)))
        pos = end + 2


def _action_end(src: str, i: int) -> int:
    """Index of the `}}` that closes the action starting at `i`, skipping quoted text."""
    while i < len(src):
        c = src[i]
        if src.startswith("}}", i):
            return i
        if c in "\"'`":
            close = src.find(c, i + 1) if c == "`" else _quoted_end(src, i, c)
            if close < 0:
                raise GoTemplateError("unterminated quoted string")
            i = close + 1
            continue
        i += 1
    raise GoTemplateError("unclosed action")


def _quoted_end(src: str, i: int, quote: str) -> int:
    i += 1
    while i < len(src):
        if src[i] == "\\":
            i += 2
            continue
        if src[i] == quote:
            return i
        if src[i] == "\n":
            break
        i += 1
    return -1


_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:\\.|[^"\\])*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|(?P<decl>:=)|(?P<assign>=)
    |(?P<var>\$[A-Za-z0-9_]*)|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<punct>[()|,]))""",
    re.X,
)


def _tokens(body: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(body):
        if body[pos:].strip() == "":
            break
        m = _TOKEN.match(body, pos)
        if not m:
            raise GoTemplateError(f"cannot parse {body[pos:]!r} in action {body!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        # a field chain may follow a variable or a closing parenthesis directly
        if kind == "var" or (kind, m.group(kind)) == ("punct", ")"):
            fm = re.match(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+", body[pos:])
            if fm:
                out.append(("chain", fm.group(0)))
                pos += fm.end()
    return out


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unquote(s: str) -> str:
    """A Go interpreted string literal's value."""
    out, i, inner = [], 0, s[1:-1]
    while i < len(inner):
        c = inner[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = inner[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(inner[i + 2: i + 2 + n], 16)))
            i += 2 + n
        elif e in "01234567":
            out.append(chr(int(inner[i + 1: i + 4], 8)))
            i += 4
        else:
            raise GoTemplateError(f"unknown escape \\{e} in {s}")
    return "".join(out)


# ---- parsing: a tree of nodes ---------------------------------------------------------------


def _parse(items: list[tuple[str, str]]) -> list:
    """Nodes: ("text", s) | ("expr", tokens) | ("if", [(cond, body)], else) | ("range", vars, expr, body, else)."""
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str, list]:
        nonlocal pos
        nodes = []
        while pos < len(items):
            kind, value = items[pos]
            pos += 1
            if kind == "text":
                if value:
                    nodes.append(("text", value))
                continue
            if value.startswith("/*"):
                continue
            toks = _tokens(value)
            word = toks[0][1] if toks and toks[0][0] == "ident" else None
            if word in ("end", "else"):
                if word not in stop:
                    raise GoTemplateError(f"unexpected {{{{ {value} }}}}")
                return nodes, word, toks[1:]
            if word == "if":
                nodes.append(if_node(toks[1:]))
            elif word == "range":
                nodes.append(range_node(toks[1:]))
            else:
                nodes.append(("expr", toks))
        if stop:
            raise GoTemplateError("missing {{ end }}")
        return nodes, "", []

    def if_node(cond: list) -> tuple:
        branches, other = [], []
        while True:
            body, word, rest = block(("end", "else"))
            branches.append((cond, body))
            if word == "end":
                return ("if", branches, other)
            if rest and rest[0] == ("ident", "if"):
                cond = rest[1:]
                continue
            other, word, _ = block(("end",))
            return ("if", branches, other)

    def range_node(toks: list) -> tuple:
        names = []
        if any(k == "decl" for k, _ in toks):
            while toks[0][0] == "var":
                names.append(toks[0][1])
                toks = toks[1:]
                if toks[0] == ("punct", ","):
                    toks = toks[1:]
            toks = toks[1:]  # :=
        body, word, _ = block(("end", "else"))
        other = block(("end",))[0] if word == "else" else []
        return ("range", names, toks, body, other)

    return block(())[0]


# ---- evaluation -----------------------------------------------------------------------------


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _truth(v) -> bool:
    if isinstance(v, dict):
        return True  # a struct (a message) in Ollama's data
    return bool(v)


def _field(v, chain: str):
    for name in chain.strip(".").split("."):
        if not name:
            continue
        if not isinstance(v, dict) or name not in v:
            raise GoTemplateError(f"can't evaluate field {name} in {type(v).__name__}")
        v = v[name]
    return v


def _eq(a, *others) -> bool:
    for b in others:
        if type(a) is not type(b):
            raise GoTemplateError(f"incompatible types for comparison: {type(a).__name__} and {type(b).__name__}")
        if a == b:
            return True
    return False


def _ne(a, b) -> bool:
    return not _eq(a, b)


def _slice(v, *idx):
    if len(idx) > 2:
        raise GoTemplateError("slice: 3-index slices are not in this subset")
    lo = idx[0] if idx else 0
    hi = idx[1] if len(idx) > 1 else len(v)
    if not 0 <= lo <= hi <= len(v):
        raise GoTemplateError(f"slice: index out of range [{lo}:{hi}] with length {len(v)}")
    return v[lo:hi]


def _index(v, *keys):
    for k in keys:
        if isinstance(v, list) and not 0 <= k < len(v):
            raise GoTemplateError(f"index out of range: {k}")
        v = v[k]
    return v


_FUNCS = {"eq": _eq, "ne": _ne, "not": lambda v: not _truth(v), "len": len, "slice": _slice, "index": _index}


class _Eval:
    def __init__(self, root):
        self.scope = _Scope(root)

    def pipeline(self, toks: list, dot):
        commands, current = [], []
        depth = 0
        for t in toks:
            if t == ("punct", "("):
                depth += 1
            elif t == ("punct", ")"):
                depth -= 1
            if t == ("punct", "|") and depth == 0:
                commands.append(current)
                current = []
            else:
                current.append(t)
        commands.append(current)
        value, piped = None, False
        for cmd in commands:
            value = self.command(cmd, dot, [value] if piped else [])
            piped = True
        return value

    def operands(self, toks: list) -> list[list]:
        """Split a command's tokens into operands (a parenthesised group with its field chain is one)."""
        out, i = [], 0
        while i < len(toks):
            if toks[i] == ("punct", "("):
                depth, j = 0, i
                while True:
                    depth += {("punct", "("): 1, ("punct", ")"): -1}.get(toks[j], 0)
                    if depth == 0:
                        break
                    j += 1
                j += 1
                if j < len(toks) and toks[j][0] == "chain":
                    j += 1
                out.append(toks[i:j])
                i = j
            elif toks[i][0] == "var" and i + 1 < len(toks) and toks[i + 1][0] == "chain":
                out.append(toks[i: i + 2])
                i += 2
            else:
                out.append([toks[i]])
                i += 1
        return out

    def command(self, toks: list, dot, extra: list):
        ops = self.operands(toks)
        head = ops[0]
        if len(head) == 1 and head[0][0] == "ident" and head[0][1] not in ("true", "false", "nil"):
            name = head[0][1]
            if name in ("and", "or"):
                thunks = [lambda o=o: self.operand(o, dot) for o in ops[1:]] + [lambda v=v: v for v in extra]
                return self.logic(name, thunks)
            if name not in _FUNCS:
                raise GoTemplateError(f'function "{name}" not defined')
            return _FUNCS[name](*[self.operand(o, dot) for o in ops[1:]], *extra)
        if len(ops) > 1 or extra:
            raise GoTemplateError(f"can't give arguments to a non-function {head}")
        return self.operand(head, dot)

    def logic(self, name: str, thunks: list):
        value = None
        for thunk in thunks:
            value = thunk()
            if _truth(value) == (name == "or"):
                return value
        return value

    def operand(self, op: list, dot):
        kind, text = op[0]
        if kind == "punct" and text == "(":
            chain = op[-1][1] if op[-1][0] == "chain" else None
            inner = op[1:-2] if chain else op[1:-1]
            value = self.pipeline(inner, dot)
            return _field(value, chain) if chain else value
        if kind == "str":
            return _unquote(text)
        if kind == "raw":
            return text[1:-1]
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "ident" and text in ("true", "false"):
            return text == "true"
        if kind == "ident" and text == "nil":
            raise GoTemplateError("nil is not a command")
        if kind == "field":
            return dot if text == "." else _field(dot, text)
        if kind == "var":
            value = self.scope.get(text)
            return _field(value, op[1][1]) if len(op) > 1 else value
        if kind == "ident":
            return self.command(op, dot, [])
        raise GoTemplateError(f"unexpected {text!r}")

    def run(self, nodes: list, dot, out: list) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "expr":
                self.expr(node[1], dot, out)
            elif kind == "if":
                for cond, body in node[1]:
                    if _truth(self.pipeline(cond, dot)):
                        self.block(body, dot, out)
                        break
                else:
                    self.block(node[2], dot, out)
            elif kind == "range":
                self.range(node, dot, out)

    def block(self, nodes: list, dot, out: list, names: dict | None = None) -> None:
        self.scope.frames.append(dict(names or {}))
        try:
            self.run(nodes, dot, out)
        finally:
            self.scope.frames.pop()

    def range(self, node: tuple, dot, out: list) -> None:
        _, names, expr, body, other = node
        seq = self.pipeline(expr, dot)
        if not isinstance(seq, list | str):
            raise GoTemplateError(f"range can't iterate over {seq!r}")
        if not seq:
            self.block(other, dot, out)
            return
        for i, item in enumerate(seq):
            bound = {names[0]: item} if len(names) == 1 else dict(zip(names, (i, item), strict=False))
            self.block(body, item, out, bound)

    def expr(self, toks: list, dot, out: list) -> None:
        if len(toks) >= 2 and toks[0][0] == "var" and toks[1][0] in ("decl", "assign"):
            value = self.pipeline(toks[2:], dot)
            if toks[1][0] == "decl":
                self.scope.frames[-1][toks[0][1]] = value
            else:
                self.scope.set(toks[0][1], value)
            return
        out.append(_print(self.pipeline(toks, dot)))


def _print(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "<no value>"
    if isinstance(v, str | int | float):
        return str(v)
    raise GoTemplateError(f"printing a {type(v).__name__} is not in this subset")


def render(template: str, data: dict) -> str:
    """`template` executed on `data`, as Go's text/template would."""
    nodes = _parse(_lex(template))
    out: list[str] = []
    _Eval(data).run(nodes, data, out)
    return "".join(out)


def ollama_render(template: str, messages: list[dict]) -> str:
    """The prompt Ollama builds: messages as `.Messages` (Role, Content) and `.System` their system text."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render(template, {"Messages": msgs, "System": system, "Response": "", "Tools": []})
