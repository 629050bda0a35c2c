"""Writing a Hugging Face model folder: safetensors shards, config.json, tokenizer files.

The folder is written under a temporary name beside the target and renamed into place, so
an interrupted save never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import QlorafitError, cannot_write

SHARD_BYTES = 2 * 1024**3


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """`model.safetensors`, or shards of at most `shard_bytes` plus `model.safetensors.index.json`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_hf_folder(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write tensors, `config.json` and the tokenizer to `directory`, atomically."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise QlorafitError(f"{directory}: exists and is not empty; choose another folder or pass overwrite=True")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_shards(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except OSError as exc:
        raise cannot_write(directory, exc, "choose a folder you can write to, with enough free space; nothing was "
                           "written there") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
