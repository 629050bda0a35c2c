"""Saving and loading adapters in PEFT's layout.

A folder with `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`. `peft.PeftModel.from_pretrained`
loads what we save onto the unquantized transformers model, and we load what PEFT saves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterError
from ..fileio import atomic_write
from .inject import ALL_LINEAR, LoraConfig, _output_head_names, add_lora, find_targets, lora_layers
from .layer import Conv1D

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "modules_to_save": "adapters that also train whole modules (modules_to_save)",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "layers_to_transform": "layers_to_transform",
}


def _saved_targets(model: nn.Module, config: LoraConfig) -> str | list[str]:
    """target_modules as PEFT should read it back: the same set of layers, and no other."""
    if config.targets != ALL_LINEAR:
        return config.targets
    suffixes = sorted({name.split(".")[-1] for name in config.wrapped})
    heads = _output_head_names(model)
    if set(find_targets(model, suffixes)) - heads == set(config.wrapped):
        return suffixes
    return sorted(config.wrapped)


def adapter_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The PEFT `adapter_config.json` content describing this model's adapter."""
    config = _require_lora(model)
    layers = lora_layers(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _saved_targets(model, config),
        "bias": "none",
        "use_rslora": config.rslora,
        "fan_in_fan_out": any(isinstance(m.base_layer, Conv1D) for m in layers.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _require_lora(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise AdapterError("this model has no LoRA layers: call add_lora(model, ...) or load_adapter first")
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's key names, float32 and contiguous."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().contiguous().cpu()
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in PEFT's layout to `directory` (each file replaced atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config_dict(model, base_model_name_or_path)
    tensors = adapter_state_dict(model)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check `adapter_config.json`; raises AdapterError naming the file on any problem."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: not found; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    problems = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={config['bias']!r})")
    if problems:
        raise AdapterError(f"{path}: unsupported adapter features: {', '.join(problems)}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: missing key {key!r}")
    number = (int, float)
    checks = {
        "r": isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0,
        "lora_alpha": isinstance(config["lora_alpha"], number) and not isinstance(config["lora_alpha"], bool),
        "lora_dropout": config.get("lora_dropout") is None or (
            isinstance(config["lora_dropout"], number) and 0 <= config["lora_dropout"] < 1),
        "target_modules": isinstance(config["target_modules"], str) or (
            isinstance(config["target_modules"], list) and config["target_modules"]
            and all(isinstance(t, str) for t in config["target_modules"])),
        "use_rslora": isinstance(config.get("use_rslora", False), bool),
    }
    bad = [f"{k}={config.get(k)!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise AdapterError(f"{path}: invalid values: {', '.join(bad)} (r: a positive integer, lora_alpha: a number, "
                           "lora_dropout: in [0, 1), target_modules: a string or a list of strings)")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: not found; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: cannot read ({exc}); the file is truncated or corrupt, re-save it") from exc


def _module_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.a.b.lora_A.weight' -> ('a.b', 'lora_A'); PEFT's '.default' is dropped."""
    key = key.removeprefix(_PREFIX).replace(".default.", ".")
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-layout LoRA adapter into `model` (adding LoRA layers if it has none)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = _read_weights(directory)
    if getattr(model, "lora_config", None) is None:
        add_lora(
            model,
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            targets=config["target_modules"],
            rslora=bool(config.get("use_rslora", False)),
        )
    layers = lora_layers(model)
    problems, seen = [], set()
    for key, tensor in weights.items():
        parsed = _module_key(key)
        if parsed is None or parsed[0] not in layers:
            problems.append(f"unexpected key {key!r}")
            continue
        name, part = parsed
        param = getattr(layers[name], part).weight
        if tuple(tensor.shape) != tuple(param.shape):
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit the model's {tuple(param.shape)}")
            continue
        seen.add((name, part))
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
    missing = [f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B") if (n, p) not in seen]
    problems += [f"missing weights for {m}" for m in missing]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
        raise AdapterError(
            f"{directory / WEIGHTS_NAME}: the adapter does not fit this model ({len(problems)} problems): {shown}. "
            "Check that it was trained on this base model."
        )
    return model
