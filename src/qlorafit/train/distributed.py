"""Training on several processes (torchrun): every decision and every sum the same on all ranks.

A `World` is what the training loop asks whenever more than one process could be involved:
which of a step's micro-batches this process runs, how the gradients of all micro-batches add
up, whether any rank wants to stop, and which rank writes files. `Local` is the one-process
world (every answer trivial); `Group` is a torch.distributed process group (gloo on CPUs,
NCCL on GPUs) started by torchrun or by a caller. The loop holds no branch on which it has.

Results do not depend on the number of processes, bit for bit:
- A step is the same `grad_accum` micro-batches of the same global, seeded order whatever the
  world size; rank r runs micro-batches r, r + N, r + 2N, ... of the step.
- Each micro-batch's loss is divided by the labelled tokens of the whole step, which every rank
  counts from the data itself.
- Dropout draws from a generator seeded by (seed, step, micro-batch), not from a running one,
  so a micro-batch gets the same masks on any rank.
- The gradients are added in micro-batch order, exactly as one process accumulates them: after
  each round of N micro-batches (one per rank) the ranks all-gather their flat LoRA gradients
  and every rank adds them in order. Adding in a fixed order is what makes 1, 2 or 3 ranks
  agree to the last bit (an all-reduce would add in an order of its own). The cost is one
  adapter-sized message per micro-batch, small for LoRA.
- Every rank then holds the same summed gradient and runs the same optimizer update on its own
  copy of the adapter and optimizer state, so nothing else needs synchronising, the clipping
  and NaN decisions agree by construction, and a checkpoint is one rank's state: today's
  format, resumable on any number of processes.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import QlorafitError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class DistributedError(QlorafitError):
    """A rank disagreed with the others, failed, or stopped answering."""


def dropout_seed(seed: int, step: int, micro_batch: int) -> int:
    """The dropout seed of one micro-batch: a hash of (seed, step, index), the same on every rank."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro_batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's generators (CPU, and `device`'s on a GPU) seeded; restore them after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
             for p in params]
    return torch.cat(parts) if parts else torch.zeros(0)


def _set_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    at = 0
    for p in params:
        p.grad = flat[at : at + p.numel()].view_as(p).to(p.dtype)
        at += p.numel()


class Local:
    """One process: every micro-batch runs here and autograd's own accumulation is the sum."""

    rank, size, main = 0, 1, True

    def rounds(self, n: int) -> Iterator[tuple[int | None, bool]]:
        """Per round of a step of `n` micro-batches: (the micro-batch this rank runs, whether it
        counts). (None, False): nothing this round; (j, False): run micro-batch j only to keep
        in step with ranks that share the model's weights (FSDP), and drop its result."""
        for j in range(n):
            yield j, True

    def gradient_sum(self, params: list[nn.Parameter]) -> GradientSum:
        return GradientSum(params)

    def max(self, value: int) -> int:
        """The largest of the ranks' `value`s (e.g. a signal number, 0 for none)."""
        return value

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def shard(self, items: list[T]) -> list[tuple[T, bool]]:
        """This rank's part of `items` (evaluation work), as (item, whether it counts): rounds
        of one item per rank, the last one filled with uncounted items when in lockstep."""
        return [(item, True) for item in items]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; an error there is raised on every rank."""
        return fn()

    def barrier(self) -> None:
        pass

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        return value

    def check_same(self, digest: str, what: str) -> None:
        """Refuse to go on when the ranks' `digest`s (see `digest_of`) of `what` differ."""

    def close(self) -> None:
        pass


class GradientSum:
    """Collects the gradient of a step's micro-batches; `total()` gives the summed loss.

    In one process autograd accumulates into `.grad` in micro-batch order; this only adds the
    losses in that order too.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.loss = 0.0

    def add(self, index: int | None, loss: float | None) -> None:
        if loss is not None:
            self.loss += loss

    def total(self) -> float:
        return self.loss


class _GatheredSum(GradientSum):
    """Per round: all-gather each rank's flat gradient and loss, add them in micro-batch order."""

    def __init__(self, params: list[nn.Parameter], group: Group) -> None:
        super().__init__(params)
        self.group = group
        self.numel = sum(p.numel() for p in params)
        self.sum: torch.Tensor | None = None

    def add(self, index: int | None, loss: float | None) -> None:
        size, device = self.group.size, self.group.device
        local = _flat_grads(self.params) if index is not None else torch.zeros(self.numel, device=device)
        for p in self.params:
            p.grad = None
        meta = torch.tensor([-1.0 if index is None else float(index), 0.0 if loss is None else loss],
                            dtype=torch.float64, device=device)
        grads = [torch.empty_like(local) for _ in range(size)]
        metas = [torch.empty_like(meta) for _ in range(size)]
        self.group.call(dist.all_gather, metas, meta)
        self.group.call(dist.all_gather, grads, local)
        for meta, grad in zip(metas, grads, strict=True):  # rank order is micro-batch order within a round
            j, value = meta.tolist()
            if j < 0:
                continue
            self.sum = grad if self.sum is None else self.sum.add_(grad)
            self.loss += value

    def total(self) -> float:
        if self.sum is not None:
            _set_grads(self.params, self.sum)
        return self.loss


class Group(Local):
    """A torch.distributed process group: this process is `rank` of `size`."""

    main = False
    lockstep = False  # True when every rank must run every forward (sharded weights are gathered in it)

    def __init__(self, timeout_s: float, owned: bool = False) -> None:
        self.owned = owned  # started here: `close` ends it
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.timeout_s = timeout_s
        nccl = torch.cuda.is_available() and "nccl" in str(dist.get_backend())
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def call(self, collective, *args, **kwargs):
        """A collective; a rank that failed or stopped answering becomes a DistributedError."""
        try:
            result = collective(*args, **kwargs)
            if self.device.type == "cuda":  # NCCL returns at once: a failure shows when the work is waited on
                torch.cuda.synchronize(self.device)
            return result
        except RuntimeError as exc:  # DistBackendError and gloo's timeouts are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank} of {self.size}: another rank failed or stopped answering within "
                f"{self.timeout_s:.0f} s ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "the run stops here. Look at the other ranks' logs, then relaunch with --resume."
            ) from exc

    def rounds(self, n: int) -> Iterator[tuple[int | None, bool]]:
        for start in range(0, n, self.size):
            index = start + self.rank
            if index < n:
                yield index, True
            else:
                yield (start if self.lockstep else None), False

    def gradient_sum(self, params: list[nn.Parameter]) -> GradientSum:
        return _GatheredSum(params, self)

    def max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.call(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.call(dist.all_reduce, t)
        return t.tolist()

    def shard(self, items: list[T]) -> list[tuple[T, bool]]:
        mine = [(item, True) for item in items[self.rank :: self.size]]
        if self.lockstep and items:
            mine += [(items[0], False)] * (-(-len(items) // self.size) - len(mine))
        return mine

    def on_main(self, fn: Callable[[], T]) -> T | None:
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        message = [f"{type(error).__name__}: {error}" if error is not None else None]
        self.call(dist.broadcast_object_list, message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise DistributedError(f"rank 0 failed: {message[0]}")
        return result

    def barrier(self) -> None:
        self.call(dist.barrier)

    def broadcast(self, value: T) -> T:
        box = [value]
        self.call(dist.broadcast_object_list, box, src=0)
        return box[0]

    def check_same(self, digest: str, what: str) -> None:
        digests = [None] * self.size
        self.call(dist.all_gather_object, digests, digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(
                f"the {what} differ between ranks (rank {differ[0]} has other values than rank 0): every rank must "
                "load the same model files with the same qlorafit, torch and config; check that all nodes see the "
                "same files"
            )

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def digest_of(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors (names, shapes, dtypes, bytes), read one tensor at a time."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        data = t.detach().contiguous().cpu()
        if data.numel():
            h.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.dtype != torch.bool
                     else data.numpy().tobytes())
    return h.hexdigest()


def torchrun_command(nproc: int, qlorafit_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun launch of `qlorafit <qlorafit_args>` on `nproc` local processes, and its environment.

    On CPUs each process gets its share of the cores (OMP_NUM_THREADS, unless already set):
    torchrun alone would give each one thread.
    """
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "qlorafit", *qlorafit_args]
    return command, env


def is_main_process() -> bool:
    """False in the processes torchrun started with a RANK other than 0."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """True in a process torchrun started as one of several (WORLD_SIZE > 1), or in a started group."""
    return dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def init_world(timeout_s: float = 600.0) -> Local:
    """The world this process trains in: a process group when launched by torchrun (or already
    started by the caller), else `Local()`.

    A group this function starts uses gloo for CPU tensors and NCCL for CUDA ones, and each rank
    takes the GPU `LOCAL_RANK` when there are GPUs; collectives that wait longer than `timeout_s`
    fail instead of hanging.
    """
    if not launched():
        return Local()
    owned = not dist.is_initialized()
    if owned:
        cuda = torch.cuda.is_available()
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise DistributedError(f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                                       "GPUs here): start at most one process per GPU (--nproc / --nproc_per_node)")
            torch.cuda.set_device(local)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    world = Group(timeout_s, owned)
    if not world.main:  # ranks other than 0 say only what goes wrong
        logging.getLogger("qlorafit").setLevel(logging.ERROR)
    logger.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world
