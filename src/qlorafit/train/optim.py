"""AdamW with optimizer state that is small (8-bit) or can leave fast memory (paged).

`AdamW(..., bits=8)` stores both moments as block-wise 8-bit codes (blocks of 256, one float32
absmax each): the first moment with the signed dynamic map, the second with the unsigned one,
as bitsandbytes' 8-bit optimizers do. Each step dequantizes a parameter's moments, updates them
in float32 and quantizes them again, so state costs ~1 byte per moment instead of 4.
Parameters smaller than `min_8bit_size` keep float32 moments (the saving is nil there).
The arithmetic is bitsandbytes' AdamW8bit's, operation for operation (its CPU kernels, and its
32-bit update for the small tensors), so the two give the same results; `bits=32` is
torch.optim.AdamW's, with the same exactness.

`paged=` a folder pages the state out of fast memory. On the CPU every state tensor lives in a
file-backed shared memory map there: the OS can write those pages out and drop them under
memory pressure instead of failing, and brings them back when the step touches them. For a
parameter on a GPU the state lives in pinned host memory and each step streams one
parameter's state to the GPU, updates it there and copies it back, so GPU memory holds the
state of one parameter at a time. The arithmetic is the same as in memory, so paged and
in-memory runs give identical results. The files are removed by `close()`.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from ..quant.blockwise import dequantize_blockwise, quantize_blockwise
from ..quant.codebooks import dynamic_map, unsigned_dynamic_map
from ..quant.state import QuantState

BLOCK = 256


class _Pager:
    """Allocates state tensors, in memory or in file-backed shared maps under a folder."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.count = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """A zeroed state tensor for a parameter on `device` (default the CPU)."""
        device = torch.device("cpu") if device is None else device
        if self.folder is None:
            return torch.zeros(numel, dtype=dtype, device=device)
        if device.type == "cuda":
            return torch.zeros(numel, dtype=dtype, pin_memory=True)
        self.count += 1
        path = self.folder / f"state-{self.count}.bin"
        t = torch.from_file(str(path), shared=True, size=max(numel, 1), dtype=dtype)[:numel]
        t.zero_()
        return t

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class AdamW(torch.optim.Optimizer):
    """AdamW with 32- or 8-bit moments, optionally paged to a file-backed memory map."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bits: int = 32, paged: str | os.PathLike | None = None,
                 min_8bit_size: int = 4096) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bits, self.min_8bit_size = bits, min_8bit_size
        self.pager = _Pager(Path(paged) if paged is not None else None)

    def _quantized(self, p: torch.Tensor) -> bool:
        return self.bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict:
        n = p.numel()
        state: dict = {"step": torch.zeros((), dtype=torch.float32)}
        if self._quantized(p):
            blocks = -(-n // BLOCK)
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_codes"] = self.pager.zeros(n, torch.uint8, p.device)
                state[f"{name}_absmax"] = self.pager.zeros(blocks, torch.float32, p.device)
        else:
            state["exp_avg"] = self.pager.zeros(n, torch.float32, p.device)
            state["exp_avg_sq"] = self.pager.zeros(n, torch.float32, p.device)
        return state

    def _moments(self, state: dict, quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not quantized:
            return state["exp_avg"], state["exp_avg_sq"]
        return (
            dequantize_blockwise(state["exp_avg_codes"], QuantState(state["exp_avg_absmax"], dynamic_map(), BLOCK)),
            dequantize_blockwise(state["exp_avg_sq_codes"], QuantState(state["exp_avg_sq_absmax"],
                                                                       unsigned_dynamic_map(), BLOCK)),
        )

    def _store(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        for name, value, code in (("exp_avg", m, dynamic_map()), ("exp_avg_sq", v, unsigned_dynamic_map())):
            codes, qs = quantize_blockwise(value, code=code, blocksize=BLOCK)
            state[f"{name}_codes"].copy_(codes)
            state[f"{name}_absmax"].copy_(qs.absmax)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                quantized = "exp_avg_codes" in state
                # Paged state of a GPU parameter lives in pinned host memory: work on a device copy.
                work = {k: t.to(p.device, non_blocking=True) if k != "step" and t.device != p.device else t
                        for k, t in state.items()}
                m, v = self._moments(work, quantized)
                grad = p.grad.reshape(-1).float()
                state["step"] += 1
                step = float(state["step"])
                lr, eps = group["lr"], group["eps"]
                flat = p.view(-1) if p.dtype == torch.float32 else p.float().view(-1)
                if group["weight_decay"] > 0:
                    flat.mul_(1 - lr * group["weight_decay"])
                if self.bits == 32:  # torch.optim.AdamW's operations, in its order: its results exactly
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                    flat.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                else:  # bitsandbytes' AdamW8bit: its blockwise 8-bit update, and its 32-bit one for small tensors
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    correction1, correction2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
                    if quantized:
                        flat.addcdiv_(m, (v.sqrt() / correction2).add_(eps), value=-lr / correction1)
                    else:
                        flat.add_(m / (v.sqrt() + eps * correction2), alpha=-lr * correction2 / correction1)
                if flat.data_ptr() != p.data_ptr():
                    p.copy_(flat.view_as(p).to(p.dtype))
                if quantized:
                    self._store(work, m, v)
                for k, t in work.items():
                    if t is not state[k]:
                        state[k].copy_(t)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state (flat moments; torch.optim.AdamW's, shaped like the parameters, are
        flattened); paged tensors go back into their memory maps."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key, value in list(state.items()):
                if key != "step" and isinstance(value, torch.Tensor):
                    flat = self.pager.zeros(value.numel(), value.dtype, value.device) if self.pager.folder else None
                    state[key] = flat.copy_(value.reshape(-1)) if flat is not None else value.reshape(-1)

    def close(self) -> None:
        """Remove the paged state files (the optimizer is unusable afterwards)."""
        self.state.clear()
        self.pager.close()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
