"""QuantState: what it takes to turn packed codes back into weights, and its serialized form.

The serialized form is bitsandbytes' own: a `Linear4bit` weight saved by either library has
the keys `absmax`, `quant_map`, (`nested_absmax`, `nested_quant_map`) and one uint8 tensor
`quant_state.bitsandbytes__<type>` holding UTF-8 JSON with the non-tensor fields. A state dict
written by one loads in the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import QuantizationError

_PACKED_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise QuantizationError(f"quant state key {key!r}: {name!r} is not a torch dtype")
    return dtype


@dataclass
class QuantState:
    """State of a block-wise quantized tensor.

    `absmax` holds one scale per block: float32, or with double quantization uint8 codes of
    `(scale - offset)` quantized by the nested state (`state2`). `code` is the code book.
    For a 4-bit state `shape` and `dtype` describe the original tensor; `quant_type` is
    "nf4" or "fp4". An 8-bit state has `quant_type=None`.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype = torch.float32
    shape: torch.Size | None = None
    quant_type: str | None = None
    offset: torch.Tensor | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        """True when the block scales are themselves quantized (double quantization)."""
        return self.state2 is not None

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor of the state to `device` (in place) and return the state."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.state2 is not None:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def nbytes(self) -> int:
        """Bytes the state occupies (scales, code books, nested scales)."""
        total = self.absmax.nbytes + self.code.nbytes
        if self.state2 is not None:
            total += self.state2.nbytes() + 4
        return total

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' dict of this state; `packed=True` gives only tensors (safetensors-ready)."""
        out: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.state2 is not None:
            out.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=float(self.offset.item()),
            )
        if not packed or self.quant_type is None:
            return out
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        extras = {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
        tensors[_PACKED_PREFIX + self.quant_type] = _pack_json(extras)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """Rebuild a state from bitsandbytes' dict (packed or not, key prefixes allowed)."""
        items = dict(qs_dict)
        packed_keys = [k for k, v in items.items() if _PACKED_PREFIX in k and isinstance(v, torch.Tensor)]
        if len(packed_keys) > 1:
            raise QuantizationError(f"more than one packed quant state in {sorted(packed_keys)}")
        if packed_keys:
            items.update(_unpack_json(items.pop(packed_keys[0]), packed_keys[0]))
        items = {k.split(".")[-1]: v for k, v in items.items()}
        required = ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape")
        missing = [k for k in required if k not in items]
        if missing:
            raise QuantizationError(f"quant state is missing {missing}; present: {sorted(items)}")
        state2 = offset = None
        if "nested_absmax" in items:
            offset = torch.tensor(float(items["nested_offset"]), device=device)
            state2 = cls(
                absmax=items["nested_absmax"].to(device),
                code=items["nested_quant_map"].to(device),
                blocksize=int(items["nested_blocksize"]),
                dtype=_dtype_from_name(items["nested_dtype"], "nested_dtype"),
            )
        shape = items["shape"]
        return cls(
            absmax=items["absmax"].to(device),
            code=items["quant_map"].to(device),
            blocksize=int(items["blocksize"]),
            dtype=_dtype_from_name(items["dtype"], "dtype"),
            shape=torch.Size(shape) if shape is not None else None,
            quant_type=items["quant_type"],
            offset=offset,
            state2=state2,
        )


def _pack_json(values: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(values).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(tensor: torch.Tensor, key: str) -> dict[str, Any]:
    try:
        return json.loads(bytes(tensor.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"{key}: not valid UTF-8 JSON ({exc}); the checkpoint is corrupt") from exc


def is_quant_state_key(key: str) -> bool:
    """True for the state-dict key suffixes that belong to a 4-bit weight's quant state."""
    last = key.split(".")[-1]
    return last in _TENSOR_KEYS or _PACKED_PREFIX in key
