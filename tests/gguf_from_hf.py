"""Writing a tiny Hugging Face model as a GGUF file the way llama.cpp's converter lays it out.

Metadata, tensor names and layouts: qlorafit's own GGUF export (`export/gguf.py`,
`export/gguf_layout.py`), whose files tests/export runs in a real llama.cpp; the tokenizer: the
byte-level BPE vocabulary of `tiny_gguf`. The loader's tests read these files back. Test support only.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from tiny_gguf import EOS_TOKEN_ID, MERGES, SPECIAL_TOKENS, finish_gguf, tokenizer_tokens

from qlorafit.export.gguf import write_metadata
from qlorafit.export.gguf_layout import Layout

VOCAB_SIZE = len(tokenizer_tokens())
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_tokenizer(writer: gguf.GGUFWriter) -> None:
    tokens = tokenizer_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS))
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(EOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID + 2)  # <|im_end|>
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf_from_hf(model, path: Path, arch: str, name: str = "tiny", qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """Write `model` (a transformers causal LM) as a GGUF file of llama.cpp architecture `arch`:
    qlorafit's exporter's metadata, names and layouts (checked in llama.cpp by tests/export), the
    tiny tokenizer, and F32 vectors with 2-D weights in `qtype`."""
    layout = Layout(model.config)
    assert layout.arch == arch, (layout.arch, arch)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    write_metadata(writer, model.config, layout)
    if getattr(model.config, "pad_token_id", None) is not None:
        writer.add_pad_token_id(model.config.pad_token_id)
    _write_tokenizer(writer)
    f32 = gguf.GGMLQuantizationType.F32
    arrays = ((k, t.detach().float().numpy()) for k, t in model.state_dict().items())
    finish_gguf(writer, [(n, a, f32 if a.ndim == 1 else qtype) for n, a in layout.tensors(arrays)])
    return path
