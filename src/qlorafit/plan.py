"""The memory planner: what a fine-tuning run will hold in memory, before it runs.

A plan adds up, in bytes: the runtime (interpreter, torch, CUDA context), the frozen weights
(4-bit codes and scales for QLoRA, the compute dtype otherwise), the LoRA weights and their
gradients, the optimizer state, the activations kept for backward, the LM head's working
memory and, on the CPU, what glibc's allocator holds on to between steps. Activations follow
how qlorafit trains a decoder: per token and layer it keeps the two norm inputs, the two
normalised inputs of the attention and MLP projections, the query, key, value and attention
output, the MLP's intermediate tensors (four for a gated MLP, two otherwise) and one-byte
dropout masks per distinct LoRA input; with gradient checkpointing only each layer's input,
plus one layer recomputed at a time. The model's linear layers are counted exactly, from the
model built on the meta device; `--params N` stands in a Llama-shaped model of N parameters.

The CPU allocator term and the runtime were measured on SmolLM2-135M (see docs/benchmarks.md,
"Memory planner", where the planner is checked against measured peak RSS); on a GPU, PyTorch's
caching allocator has its own overhead, which the planner does not model beyond the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import QlorafitError
from .sysmem import free_memory

GiB = 1024**3
MiB = 1024**2
METHODS = ("qlora", "lora", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
STRATEGIES = ("ddp", "fsdp")
RUNTIME_BYTES = {"cpu": 330 * MiB, "cuda": 600 * MiB}  # interpreter + torch + transformers + tokenizer; CUDA context
# Freed activation-sized temporaries that glibc's heap keeps (pinned by live tensors allocated
# after them), as a share of the activations one un-checkpointed forward pass creates. With
# checkpointing the recomputed layers create them again in backward, so the share is the same.
CPU_ALLOCATOR_SLACK = 0.45
HEAD_CHUNK_BYTES = 64 * MiB  # one chunk of logits in the chunked cross-entropy


@dataclass
class ModelShape:
    """What the planner needs to know about a decoder."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool
    linear: list[tuple[int, int]] = field(default_factory=list)  # (in, out) of every all-linear target
    other_params: int = 0  # embeddings, norms, biases, an untied output head

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linear)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def shape_from_config(config, name: str = "model") -> ModelShape:
    """A model's shape, from its config: built on the meta device, linear layers counted exactly."""
    from .lora.inject import find_targets
    from .lora.layer import base_features
    from .models.meta import empty_model

    model = empty_model(config)
    targets = find_targets(model, "all-linear")
    linear, linear_weights = [], set()
    for t in targets:
        m = model.get_submodule(t)
        linear.append(base_features(m))
        linear_weights.add(id(m.weight))
    seen: set[int] = set()
    other = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in linear_weights:
            continue
        seen.add(id(p))
        other += p.numel()
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(c, "hidden_size", "n_embd", "d_model")
    heads = _first(c, "num_attention_heads", "n_head")
    intermediate = _first(c, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    names = " ".join(n for n, _ in model.named_modules())
    return ModelShape(
        name=name,
        hidden=hidden,
        intermediate=intermediate,
        layers=_first(c, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=_first(c, "num_key_value_heads", default=None) or heads,
        head_dim=_first(c, "head_dim", default=None) or hidden // heads,
        vocab=c.vocab_size,
        gated="gate_proj" in names or "w3" in names or "gate_up_proj" in names,
        linear=linear,
        other_params=other,
    )


def _first(config, *names, default: object = ...):
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    if default is ...:
        raise QlorafitError(f"the model config has none of {', '.join(names)}; the planner cannot size it")
    return default


def shape_from_params(params: float, vocab: int = 32000) -> ModelShape:
    """A Llama-shaped decoder of about `params` parameters (hidden = 128 x layers, gated MLP)."""
    if params <= 0:
        raise QlorafitError(f"--params must be positive, got {params:g}")
    best = None
    for layers in range(1, 161):
        hidden = 128 * layers
        inter = 256 * round(8 * hidden / 3 / 256)
        total = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
        if best is None or abs(total - params) < abs(best[0] - params):
            best = (total, layers, hidden, inter)
    _, layers, hidden, inter = best
    per_layer = [(hidden, hidden)] * 4 + [(hidden, inter), (hidden, inter), (inter, hidden)]
    return ModelShape(
        name=f"{params / 1e9:g}B (Llama-shaped)", hidden=hidden, intermediate=inter, layers=layers,
        heads=hidden // 128, kv_heads=hidden // 128, head_dim=128, vocab=vocab, gated=True,
        linear=per_layer * layers, other_params=2 * vocab * hidden + layers * 2 * hidden + hidden,
    )


@dataclass
class Plan:
    """Bytes per component, the total that must fit, and what the device offers."""

    shape: ModelShape
    settings: dict
    rows: dict[str, int]
    pageable: int  # paged optimizer state, kept outside fast memory
    available: int

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def table(self) -> str:
        s = self.settings
        lines = [
            f"{self.shape.name}: {self.shape.params / 1e6:,.1f}M parameters, {self.shape.layers} layers",
            f"{s['method']}, batch {s['batch']} x {s['seq']} tokens, r={s['rank']}, {s['optimizer']}, "
            f"gradient checkpointing {_mode(s['grad_checkpointing'])}, {s['device']} "
            f"({s['compute_dtype']} compute)",
            *([f"{s['devices']} devices, {s['strategy']}: memory per device"] if s.get("devices", 1) > 1 else []),
            "",
            f"{'component':<26}{'MiB':>12}",
        ]
        for name, value in self.rows.items():
            lines.append(f"{name:<26}{value / MiB:>12,.0f}")
        lines.append(f"{'total':<26}{self.total / MiB:>12,.0f}")
        if self.pageable:
            lines.append(f"{'paged optimizer state':<26}{self.pageable / MiB:>12,.0f}  (outside fast memory)")
        lines.append(f"{'available':<26}{self.available / MiB:>12,.0f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"\n{verdict}: {self.total / GiB:.2f} GiB of {self.available / GiB:.2f} GiB")
        return "\n".join(lines)


def _mode(grad_checkpointing: bool | str) -> str:
    return grad_checkpointing if isinstance(grad_checkpointing, str) else ("on" if grad_checkpointing else "off")


def plan(
    shape: ModelShape,
    method: str = "qlora",
    batch: int = 4,
    seq: int = 512,
    rank: int = 16,
    optimizer: str = "adamw",
    grad_checkpointing: bool | str = False,
    device: str = "cpu",
    available: int | None = None,
    dropout: float = 0.05,
    double_quant: bool = True,
    blocksize: int = 64,
    devices: int = 1,
    strategy: str = "ddp",
) -> Plan:
    """The memory a run would need on each device; `available` defaults to the device's memory
    (`device_memory`).

    With `devices` > 1, `strategy` ddp holds the whole frozen base on every device; fsdp holds
    1/devices of its 4-bit codes plus the layers gathered whole while they run (the current one
    and the prefetched next); block scales, embeddings and norms stay whole. Adapters, their
    gradients and optimizer state are on every device in both.
    Several CPU processes share one machine's memory: each gets 1/devices of it.
    """
    if strategy not in STRATEGIES:
        raise QlorafitError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if devices < 1:
        raise QlorafitError(f"devices must be at least 1, got {devices}")
    if strategy == "fsdp" and method != "qlora":
        raise QlorafitError("strategy fsdp shards a 4-bit base's codes: it plans method qlora only")
    if method not in METHODS:
        raise QlorafitError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise QlorafitError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if batch <= 0 or seq <= 0 or rank <= 0:
        raise QlorafitError("batch, seq and rank must be positive")
    kind, dev_bytes = parse_device(device)
    cbytes = 4 if kind == "cpu" else 2  # fp32 on CPUs, bf16 on GPUs (compute_dtype auto)
    rows: dict[str, int] = {"runtime": RUNTIME_BYTES[kind]}

    lin, other = shape.linear_params, shape.other_params
    if method == "qlora":
        scale_bytes = (1 / blocksize + 4 / (blocksize * 256)) if double_quant else 4 / blocksize
        code_books = 16 * 4 + (256 * 4 + 4 if double_quant else 0)  # per layer: the 4-bit and nested code books
        rows["frozen weights"] = int(lin * (0.5 + scale_bytes) + len(shape.linear) * code_books + other * cbytes)
    elif method == "lora":
        rows["frozen weights"] = (lin + other) * cbytes
    else:
        rows["weights"] = (lin + other) * 4
    trainable = (lin + other) if method == "full" else sum(rank * (i + o) for i, o in shape.linear)
    if strategy == "fsdp" and devices > 1:  # the 4-bit codes are sharded; scales, embeddings, norms stay whole
        codes = lin // 2
        rows["frozen weights"] -= codes
        rows["4-bit codes (shard)"] = -(-codes // devices)
        rows["gathered layers"] = int(2 * codes / max(shape.layers, 1))
    if method != "full":
        rows["LoRA weights"] = trainable * 4
    rows["gradients"] = trainable * 4
    state = trainable * (2 * (1 + 4 / 256) if optimizer.endswith("8bit") else 8)
    pageable = int(state) if optimizer.startswith("paged_") else 0
    if not pageable:
        rows["optimizer state"] = int(state)

    tokens = batch * seq
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token_layer = cbytes * (4 * h + 2 * q + 2 * kv + (4 if shape.gated else 2) * shape.intermediate)
    if method != "full" and dropout > 0:
        per_token_layer += 2 * h + q + shape.intermediate  # one bool mask per distinct LoRA input
    layer = tokens * per_token_layer
    kept = tokens * h * cbytes * shape.layers + layer if grad_checkpointing else layer * shape.layers
    if grad_checkpointing == "selective":  # plus every linear layer's base output, kept for the recomputation
        kept += tokens * cbytes * sum(o for _, o in shape.linear)
    rows["activations"] = int(kept)
    head_rows = min(tokens, max(16, HEAD_CHUNK_BYTES // (4 * shape.vocab)))
    rows["LM head and loss"] = int(2 * tokens * h * cbytes + 2 * head_rows * shape.vocab * 4)
    rows["backward working set"] = int(layer)
    if kind == "cpu":
        rows["allocator slack"] = int(CPU_ALLOCATOR_SLACK * layer * shape.layers)
    settings = {"method": method, "batch": batch, "seq": seq, "rank": rank, "optimizer": optimizer,
                "grad_checkpointing": grad_checkpointing, "device": device,
                "compute_dtype": "float32" if cbytes == 4 else "bfloat16", "devices": devices, "strategy": strategy}
    if available is None:
        available = dev_bytes // devices if kind == "cpu" else dev_bytes
    return Plan(shape, settings, rows, pageable, available)


def parse_device(device: str) -> tuple[str, int]:
    """'cpu', 'cpu:16GB', 'cuda', 'cuda:24GB' -> (kind, bytes of memory)."""
    kind, _, size = device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise QlorafitError(f"unknown device {device!r}: use cpu, cuda, or cpu:16GB / cuda:24GB")
    if size:
        return kind, _parse_size(size, device)
    return kind, device_memory(kind)


def _parse_size(text: str, device: str) -> int:
    units = {"TB": 1024**4, "GB": GiB, "MB": MiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B") + "B"  # 24G, 24GB, 24GiB -> 24GB
    if t[-2:] in units:
        try:
            return int(float(t[:-2]) * units[t[-2:]])
        except ValueError:
            pass
    raise QlorafitError(f"cannot read the memory size in {device!r}: write it like cuda:24GB or cpu:16GB")


def device_memory(kind: str) -> int:
    """Memory available now: MemAvailable on the CPU, free memory of GPU 0 on CUDA."""
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise QlorafitError("no CUDA device here; give its size, e.g. --device cuda:24GB")
    return free_memory(kind)
