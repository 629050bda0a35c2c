"""The test-only Go text/template renderer against behaviours Go's documentation states.

Expected outputs are written from the text/template package documentation (trim markers,
else if, range with else, variable scope and assignment, and/or returning an argument and
stopping early, eq with several arguments) rather than from this renderer's own output.
"""

import pytest

from tests.go_template import GoTemplateError, ollama_render, render


@pytest.mark.parametrize(
    "template, data, expected",
    [
        # the documented trim example: "{{23 -}} < {{- 45}}" -> "23<45"
        ("{{23 -}} < {{- 45}}", {}, "23<45"),
        # trimming removes all spaces, tabs, carriage returns and newlines next to the marker, and only there
        ("a \t\r\n {{- .X -}} \n\t b", {"X": "x"}, "axb"),
        ("a \n{{ .X }}\n b", {"X": "x"}, "a \nx\n b"),
        ("a\n\n{{- .X }}\n", {"X": "x"}, "ax\n"),
        # "{{-3}}" is the number -3, not a trim marker (the dash must be followed by a space)
        ("{{-3}}", {}, "-3"),
        # trimming applies to template text, never to what an action prints
        ("{{ .X }}\n{{- .Y }}", {"X": "x \n", "Y": "\n y"}, "x \n\n y"),
        ("{{ if eq .R \"user\" }}U{{ else if eq .R \"assistant\" }}A{{ else }}O{{ end }}", {"R": "assistant"}, "A"),
        ("{{ if eq .R \"user\" }}U{{ else if eq .R \"assistant\" }}A{{ else }}O{{ end }}", {"R": "tool"}, "O"),
        # eq with several arguments is true when the first equals any of the others
        ("{{ eq .R \"a\" \"b\" \"c\" }}", {"R": "c"}, "true"),
        ("{{ ne 1 2 }} {{ not \"\" }} {{ not \"x\" }}", {}, "true true false"),
        # and/or return the deciding argument
        ("{{ and 1 0 }}|{{ and 1 2 }}|{{ or 0 \"\" }}|{{ or 0 \"x\" }}", {}, "0|2||x"),
        # and stops at the first empty argument: the index out of range is never evaluated
        ("{{ if and .L (eq (index .L 0) \"a\") }}yes{{ else }}no{{ end }}", {"L": []}, "no"),
        ("{{ len .L }} {{ len (slice .L 1) }} {{ index .L 2 }}", {"L": ["a", "b", "c"]}, "3 2 c"),
        # range binds index and element; a variable declared in the body lives for one iteration
        (
            "{{ range $i, $m := .L }}{{ $last := eq (len (slice $.L $i)) 1 }}{{ $i }}{{ .Role }}"
            "{{ if not $last }},{{ end }}{{ end }}",
            {"L": [{"Role": "a"}, {"Role": "b"}, {"Role": "c"}]},
            "0a,1b,2c",
        ),
        ("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}, "empty"),
        # = assigns the outer variable (Go 1.11+), := inside a block declares a new one
        ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}, "2"),
        ("{{ $x := 1 }}{{ if true }}{{ $x := 2 }}{{ $x }}{{ end }}{{ $x }}", {}, "21"),
        # a field of a parenthesised pipeline, $ as the data inside range
        ("{{ range .L }}{{ (index $.L 0).Role }}{{ end }}", {"L": [{"Role": "s"}, {"Role": "u"}]}, "ss"),
        # interpreted string constants take Go escapes; raw strings take none
        ('{{ "a\\nb\\"c\\u00e9\\\\" }}|{{ `x\\ny` }}', {}, 'a\nb"cé\\|x\\ny'),
        ('{{ "}}" }}', {}, "}}"),
        ('{{ "a" | eq "a" }}', {}, "true"),  # a pipe passes its value as the last argument
        ("{{/* a comment */}}a{{- /* trimmed */ -}} b", {}, "ab"),
    ],
)
def test_documented_behaviour(template, data, expected):
    assert render(template, data) == expected


@pytest.mark.parametrize(
    "template, data",
    [
        ("{{ eq 1 \"1\" }}", {}),  # incompatible types for comparison
        ("{{ index .L 3 }}", {"L": [1]}),
        ("{{ .Missing }}", {}),
        ("{{ unknown 1 }}", {}),
        ("{{ if true }}no end", {}),
        ("{{ end }}", {}),
    ],
)
def test_errors(template, data):
    with pytest.raises(GoTemplateError):
        render(template, data)


def test_ollama_render_gives_messages_and_system():
    template = "{{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert ollama_render(template, messages) == "s|system:s;user:u;"
