"""The run configuration: one typed schema, read from YAML, overridden by `--set key=value`.

Each option is defined once, here, with its type, default and help text; the YAML file and the
command line only override it (command line > YAML > defaults), and `docs/config.md` is
checked against this schema by the tests. Unknown keys are errors that name the file, the line
and the nearest valid key; every problem in a file is reported at once.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import QlorafitError


class ConfigError(QlorafitError):
    """A configuration file or override that is not valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantConfig(_Section):
    type: Literal["nf4", "fp4", "none"] = Field("nf4", description="4-bit type of the frozen base weights; none = plain LoRA")
    double_quant: bool = Field(True, description="quantize the block scales too (4.127 instead of 4.5 bits per weight)")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(64, description="weights per quantization block")
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the matmuls: auto = bf16 on CUDA, fp32 on CPUs without bf16 units"
    )


class LoraSection(_Section):
    r: int = Field(16, gt=0, description="rank of the update")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    targets: str | list[str] = Field(
        "all-linear", description="all-linear, a list of module-name suffixes, or a regex over full module names"
    )
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")


class SourceConfig(_Section):
    path: str = Field(..., min_length=1, description="a .jsonl/.json/.parquet/.csv/.tsv/.arrow file, a datasets "
                      "folder, or a hub name when online")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "completion", "text"] = Field(
        "auto", description="record format of this source")
    fields: dict[str, str] = Field(default_factory=dict, description="qlorafit's field names -> this source's "
                                   "column names, e.g. {prompt: question, completion: answer}")
    split: str | None = Field(None, description="split of a datasets folder or hub dataset (default train)")
    weight: float = Field(1.0, gt=0, description="share in the mix: round(weight x records) of this source")


class DataConfig(_Section):
    train: str | list[SourceConfig] = Field(
        ..., description="training data (required): a path, or a list of sources {path, format, fields, split, weight}")
    eval: str | SourceConfig | None = Field(None, description="held-out data for eval loss and perplexity")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="hold out this fraction of the training records "
                                 "(seeded) for evaluation instead of a data.eval source")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "completion", "text"] = Field(
        "auto", description="record format; auto detects it from the first record"
    )
    max_length: int = Field(512, ge=2, description="tokens per example; longer ones keep their first max_length tokens")
    train_on: Literal["completion", "all"] = Field(
        "completion", description="completion = loss on assistant / completion tokens only; all = every token"
    )
    packing: bool = Field(False, description="pack several examples per row (they never attend to each other)")


class TrainConfig(_Section):
    epochs: int = Field(1, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to run; overrides epochs")
    batch_size: int = Field(4, gt=0, description="examples (or packed rows) per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(2.0e-4, gt=0, description="peak learning rate")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="learning-rate decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0 to lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this; null disables")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = Field(
        "adamw", description="adamw; adamw8bit keeps both moments in 8 bits; paged_* keep state in a file-backed map"
    )
    grad_checkpointing: bool | Literal["auto", "full", "selective", "off"] = Field(
        "auto", description="recompute each decoder layer in backward to save memory: full (or true) recomputes it "
        "whole; selective keeps each linear layer's output and recomputes the rest (faster, more memory); off (or "
        "false); auto = off if the memory planner says the run fits without, else selective if that fits, else full"
    )
    max_bad_steps: int = Field(
        5, gt=0, description="stop after this many steps in a row with a NaN or infinite loss or gradient (each is skipped)"
    )
    seed: int = Field(0, description="seed for LoRA init, dropout and data order")
    log_every: int = Field(1, gt=0, description="log train loss every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints to keep")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: ddp = every rank holds the whole 4-bit base; fsdp = the base's 4-bit "
        "codes are sharded across ranks; auto = ddp when the planner says the base fits on each device, else fsdp"
    )
    distributed_timeout: float = Field(
        600.0, gt=0, description="seconds a rank waits for the others before the run stops with an error"
    )


class RunConfig(_Section):
    model: str = Field("smollm2-135m-instruct", min_length=1, description="HF folder, .gguf file, bnb-4bit folder or alias")
    allow_pickle: bool = Field(False, description="read pytorch_model*.bin weights (with torch.load weights_only=True)")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model; only for code you have read")
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = Field("runs/example", min_length=1, description="where checkpoints, the adapter and metrics go")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers that also get the metrics and the configuration")


def schema_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema with its pydantic field (sections are walked, not listed)."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.update(schema_keys(sub, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field
    return keys


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key in a YAML document, by key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _suggest(path: tuple[str, ...]) -> str:
    options = [k for k in schema_keys() if k.count(".") == len(path) - 1]
    near = difflib.get_close_matches(".".join(str(p) for p in path), options, n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys here: {', '.join(sorted(options))}"


def _problems(exc: ValidationError, where: str, lines: dict[tuple[str, ...], int]) -> list[str]:
    out = []
    for err in exc.errors():
        path = tuple(str(p) for p in err["loc"])
        line = lines.get(path) or lines.get(path[:-1])
        at = f"{where}:{line}" if line else where
        key = ".".join(path)
        if err["type"] == "extra_forbidden":
            out.append(f"{at}: unknown key {key!r}{_suggest(path)}")
        elif err["type"] == "missing":
            out.append(f"{at}: missing required key {key!r}")
        else:
            out.append(f"{at}: {key}: {err['msg']} (got {err.get('input')!r})")
    return out


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001): read as YAML, except for plain text keys."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    field = schema_keys().get(key)
    if field is None:
        raise ConfigError(f"--set {key}: unknown key{_suggest(tuple(key.split('.')))}")
    if field.annotation in (str, str | None) and raw.strip() not in ("null", "~"):
        return key, raw  # a path or a name: never reinterpret "0123" or "true" here
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {raw!r} ({exc})") from exc


def build_config(tree: dict, where: str = "<config>", lines: dict | None = None) -> RunConfig:
    """Validate a nested dict into a RunConfig; raises ConfigError listing every problem."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = _problems(exc, where, lines or {})
        raise ConfigError(f"{len(problems)} problem(s) in the configuration:\n  " + "\n  ".join(problems)) from exc


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply `--set` overrides."""
    tree: dict = {}
    lines: dict = {}
    where = "<command line>"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        text = p.read_text(encoding="utf-8")
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping of keys at the top level")
        lines = _key_lines(text)
    for item in overrides:
        _set_path(tree, *parse_override(item))
    return build_config(tree, where, lines)


# keys that change where and how often a run reports or saves, never the adapter it trains
_NOT_RESULTS = {"output_dir", "report_to", "allow_pickle", "trust_remote_code", "data.train", "data.eval", "train.log_every",
                "train.eval_every",
                "train.save_every", "train.keep_last", "train.max_bad_steps", "train.distributed",
                "train.distributed_timeout"}


def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys ({"train": {"lr": 1}} -> {"train.lr": 1});
    lists and other values are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(config: RunConfig) -> dict[str, Any]:
    """Everything that decides the adapter a run trains: the configuration's result keys (dotted
    names; a list of sources stays one key) and the sha256 of the training data files (not their
    paths: moving a file changes nothing). A run resumes exactly only under the same one."""
    flat = {k: v for k, v in dotted(config.model_dump()).items()
            if k not in _NOT_RESULTS and not k.startswith("data.eval.")}
    sources = config.data.train if isinstance(config.data.train, list) else [SourceConfig(path=config.data.train)]
    if isinstance(config.data.train, list):  # how each source is read and weighted, not where it lies
        flat["data.train (sources)"] = [s.model_dump(exclude={"path"}) for s in sources]
    digest = hashlib.sha256()
    for source in sources:
        path = Path(source.path).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for file in files:
            if path.is_dir():
                digest.update(str(file.relative_to(path)).encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(chunk)
    flat["data.train (sha256)"] = digest.hexdigest()
    return flat


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every key whose value differs."""
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (every key, defaults included)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
