"""The training loop: a plain function over a model, an optimizer and lists of batches.

Determinism is by construction: the data order of epoch e comes from `seed + e`, the dropout of
each micro-batch from a generator seeded by (seed, step, micro-batch), and a checkpoint is only
taken between optimizer steps. A run resumed from step k therefore replays steps k+1.. exactly
as the uninterrupted run would, and ends with the same adapter, bit for bit, on any number of
processes (`distributed.py`: the loop asks its `World` wherever several could be involved).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig, fingerprint_changes
from ..data.batches import batch_order, pack_rows, packed_batch, pad_batch
from ..data.dataset import Dataset
from ..errors import TrainingError, TrainingInterrupted, cannot_write
from ..evaluate import loss_metrics, loss_totals
from ..faults import reached
from ..fileio import atomic_write
from ..lora.layer import keep_base_outputs, release_kept_outputs
from ..quant.blockwise import dequant_workspace
from .checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    read_fingerprint,
    remove_partial,
    save_checkpoint,
)
from .distributed import Local, dropout_seed, seeded
from .loss import IGNORE, causal_lm_loss
from .optim import AdamW
from .schedule import make_scheduler

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Where a run writes, and how its data is batched."""

    output_dir: Path
    pad_id: int
    max_length: int
    packing: bool = False
    on_log: Callable[[dict], None] | None = None
    fingerprint: dict | None = None  # what the results depend on (config.fingerprint), saved in checkpoints
    allow_changes: bool = False  # resume even when the fingerprint differs (no longer exact)


def epoch_batches(data: Dataset, cfg: TrainConfig, run: Run, epoch: int) -> list[list[list[int]]]:
    """The micro-batches of one epoch, in the order seeded by `cfg.seed + epoch`.

    A batch is a list of rows and a row a list of example indices: one example per row when
    padding, several when packing. Tensors are only built when a batch is used (`collate`).
    """
    seed = cfg.seed + epoch
    if run.packing:
        order = torch.randperm(len(data.examples), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = pack_rows(data.examples, order, run.max_length)
        return [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    return [[[i] for i in group] for group in batch_order(data.lengths, cfg.batch_size, seed)]


def collate(data: Dataset, batch: list[list[int]], run: Run) -> dict[str, torch.Tensor]:
    """Tensors of one micro-batch (padded or packed rows)."""
    if run.packing:
        return packed_batch([[data.examples[i] for i in row] for row in batch], run.pad_id)
    return pad_batch([data.examples[row[0]] for row in batch], run.pad_id)


def labelled_tokens(data: Dataset, batch: list[list[int]]) -> int:
    """Positions of a micro-batch whose next token has a label, counted from the examples
    (what `collate(...)["labels"][:, 1:]` holds): every labelled token but a row's first."""
    count = 0
    for row in batch:
        examples = [data.examples[i] for i in row]
        count += sum(label != IGNORE for e in examples for label in e.labels)
        count -= examples[0].labels[0] != IGNORE
    return count


def make_optimizer(model: nn.Module, cfg: TrainConfig, output_dir: Path, rank: int = 0) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over the trainable parameters (paged: one folder per rank).

    All four are `optim.AdamW`: adamw computes exactly as torch.optim.AdamW on float32 moments,
    and its paged form gives the same results bit for bit (the state only lives elsewhere).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    bits = 8 if cfg.optimizer.endswith("8bit") else 32
    paged = output_dir / "optimizer-pages" / f"rank-{rank}" if cfg.optimizer.startswith("paged_") else None
    return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, bits=bits, paged=paged)


def enable_grad_checkpointing(model: nn.Module, selective: bool = False) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations.

    `selective` keeps each LoRA layer's base output from the forward, so the recomputation
    skips its dequantization and matmul and redoes only the rest (norms, attention, activations).
    """
    keep_base_outputs(model, selective)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def total_steps(n_batches: int, cfg: TrainConfig) -> int:
    """Optimizer steps of the run: max_steps, or epochs x ceil(batches / grad_accum)."""
    return cfg.max_steps or cfg.epochs * math.ceil(n_batches / cfg.grad_accum)


def _labelled(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def evaluate_loss(model: nn.Module, data: Dataset, cfg: TrainConfig, run: Run, world: Local | None = None) -> dict:
    """Token-weighted mean cross-entropy and perplexity over a dataset (no dropout), its batches
    shared among the ranks."""
    world = world or Local()
    bs = cfg.batch_size
    batches = [data.examples[i : i + bs] for i in range(0, len(data.examples), bs)]
    mine = world.shard(batches)
    fillers = [b for b, counts in mine if not counts]
    if fillers:
        loss_totals(model, fillers, run.pad_id)  # in step with the other ranks only
    total, tokens = world.sum(list(loss_totals(model, [b for b, counts in mine if counts], run.pad_id)))
    result = loss_metrics(total, int(tokens))
    return {"eval_loss": result["loss"], "eval_ppl": result["perplexity"], "eval_tokens": result["tokens"]}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro, max_grad_norm: float | None = None,
               world: Local | None = None, tokens: int | None = None,
               seeds: list[int] | None = None) -> tuple[float, bool, float]:
    """One optimizer step over the micro-batches `micro`: (mean loss per labelled token, applied,
    gradient norm before clipping).

    Gradients are accumulated token-weighted: the loss is the sum over all labelled tokens of
    all micro-batches divided by their count (`tokens`, counted from `micro` when not given),
    as if they were one batch. `micro` may be a lazy sequence: a rank only reads the
    micro-batches it runs. `seeds[j]`, when given, seeds the dropout of micro-batch j. When the
    loss or any gradient is NaN or infinite the update is not applied (`applied` is False) and
    the gradients are dropped, so one bad batch cannot poison the adapter.
    """
    world = world or Local()
    tokens = sum(_labelled(b) for b in micro) if tokens is None else tokens
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    summed = world.gradient_sum(params)
    for j, counts in world.rounds(len(micro)):
        loss = None
        if j is not None:
            with seeded(seeds[j], device) if seeds is not None else contextlib.nullcontext():
                loss_sum, _ = causal_lm_loss(model, micro[j])
                (loss_sum / max(tokens, 1)).backward()
            release_kept_outputs(model)
            loss = float(loss_sum.detach())
        summed.add(j if counts else None, loss if counts else None)
    total = summed.total()
    grads = [p.grad for p in params if p.grad is not None]
    finite = math.isfinite(total) and all(bool(torch.isfinite(g).all()) for g in grads)
    norm = math.nan
    if finite:  # clipping at infinity scales by exactly 1: the norm, with the gradients unchanged
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)) if grads else 0.0
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(tokens, 1), finite, norm


class _Collated:
    """The micro-batches of a step, collated when (and only where) they are read."""

    def __init__(self, data: Dataset, batches: list[list[list[int]]], run: Run, device: torch.device) -> None:
        self.data, self.batches, self.run, self.device = data, batches, run, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(self.data, self.batches[j], self.run).items()}


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as exc:
        raise cannot_write(path, exc, "free space (the checkpoints are intact), then continue with --resume") from exc


def _log(run: Run, row: dict) -> None:
    _append(run.output_dir / "metrics.jsonl", json.dumps(row) + "\n")
    if run.on_log is not None:
        run.on_log(row)


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _check_fingerprint(run: Run, folder: Path) -> None:
    """Refuse to resume under another configuration or data: the result would not be exact."""
    saved = read_fingerprint(folder)
    if run.fingerprint is None or saved is None:
        return
    changes = fingerprint_changes(saved, run.fingerprint)
    if not changes:
        return
    listed = "; ".join(changes[:12]) + (f"; ... ({len(changes)} in all)" if len(changes) > 12 else "")
    if run.allow_changes:
        logger.warning("resuming %s under a changed configuration (%s): the result will not be the one the "
                       "uninterrupted run would have given", folder, listed)
        return
    raise TrainingError(
        f"{folder}: was saved under another configuration or training data ({listed}); resuming would not continue "
        "the same run. Restore the settings, or pass --allow-config-change to resume anyway (not exact)"
    )


def _resume(run: Run, model, optimizer, scheduler, world: Local) -> Position:
    folder = latest_checkpoint(run.output_dir / "checkpoints")
    if folder is None:
        logger.warning("%s: no complete checkpoint to resume from; starting at step 0", run.output_dir)
        position = Position()
    else:
        _check_fingerprint(run, folder)
        position = load_checkpoint(folder, model, optimizer, scheduler)
        logger.info("resuming from %s (step %d)", folder, position.step)

    def tidy() -> None:
        for name in remove_partial(run.output_dir / "checkpoints"):
            logger.warning("removed %s, a checkpoint write that did not finish", name)
        metrics = run.output_dir / "metrics.jsonl"
        if metrics.is_file():  # forget what was logged after the checkpoint: those steps run again
            kept = [line for line in metrics.read_text().splitlines() if _logged_step(line) <= position.step]
            atomic_write(metrics, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    world.on_main(tidy)
    return position


class _StopSignals:
    """Turns SIGINT / SIGTERM into a request to stop after the current step (main thread only).

    A second signal while stopping raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(model: nn.Module, train_data: Dataset, eval_data: Dataset | None, cfg: TrainConfig, run: Run,
          resume: bool = False, world: Local | None = None) -> dict:
    """Train the model's trainable (LoRA) parameters; returns the last eval metrics (if any) and
    the run's figures: steps (in all; `steps_run` in this call), skipped steps, tokens, seconds,
    tokens/s (this call) and the last train loss.

    `world` is the set of processes training together (`distributed.init_world`); by default
    this process alone.
    """
    world = world or Local()
    optimizer = make_optimizer(model, cfg, run.output_dir, world.rank)
    try:
        with _StopSignals() as stop, dequant_workspace():
            return _train(model, optimizer, train_data, eval_data, cfg, run, resume, stop, world)
    finally:
        if hasattr(optimizer, "close"):
            optimizer.close()
            with contextlib.suppress(OSError):  # the last rank to close removes the shared folder
                (run.output_dir / "optimizer-pages").rmdir()


def _train(model, optimizer, train_data, eval_data, cfg: TrainConfig, run: Run, resume: bool, stop: _StopSignals,
           world: Local) -> dict:
    n_batches = len(epoch_batches(train_data, cfg, run, 0))
    total = total_steps(n_batches, cfg)
    scheduler = make_scheduler(optimizer, total, cfg.warmup_steps, cfg.schedule)
    position = _resume(run, model, optimizer, scheduler, world) if resume else Position()
    model.train()
    device = next(model.parameters()).device
    checkpoints = run.output_dir / "checkpoints"

    def save() -> Path | None:
        return world.on_main(lambda: save_checkpoint(checkpoints, model, optimizer, scheduler, position, cfg.keep_last,
                                                     run.fingerprint))

    def log(row: dict) -> None:
        if world.main:
            _log(run, row)

    last_eval: dict = {}
    bad_in_row, steps_run, loss = 0, 0, math.nan
    start, tokens_seen = time.perf_counter(), 0
    while position.step < total:
        batches = epoch_batches(train_data, cfg, run, position.epoch)
        while position.batch < len(batches) and position.step < total:
            chosen = batches[position.batch : position.batch + cfg.grad_accum]
            lr = scheduler.get_last_lr()[0]
            seeds = [dropout_seed(cfg.seed, position.step, j) for j in range(len(chosen))]
            loss, applied, grad_norm = train_step(model, optimizer, _Collated(train_data, chosen, run, device), cfg.max_grad_norm,
                                       world, sum(labelled_tokens(train_data, b) for b in chosen), seeds)
            scheduler.step()
            position.batch += len(chosen)
            position.step += 1
            steps_run += 1
            bad_in_row = 0 if applied else bad_in_row + 1
            position.skipped += not applied
            tokens_seen += sum(len(train_data.examples[i]) for b in chosen for row in b for i in row)
            elapsed = time.perf_counter() - start
            if not applied or position.step % cfg.log_every == 0 or position.step == total:
                log({"step": position.step, "epoch": position.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "elapsed_s": elapsed, "total_steps": total,
                     **({} if applied else {"skipped": True, "skipped_total": position.skipped})})
            reached("step")  # a test may kill the process here
            if not applied:
                logger.warning("step %d: NaN or infinite loss or gradient; update skipped (%d in a row)",
                               position.step, bad_in_row)
                if bad_in_row >= cfg.max_bad_steps:
                    good = latest_checkpoint(checkpoints)
                    raise TrainingError(
                        f"{run.output_dir}: {bad_in_row} steps in a row (up to step {position.step}) had a NaN or "
                        f"infinite loss or gradient, so the run stopped; the last good checkpoint is "
                        f"{good or 'none (no checkpoint was saved yet)'}. Lower train.lr, check the data, or raise "
                        "train.max_bad_steps."
                    )
            if eval_data is not None and cfg.eval_every and position.step % cfg.eval_every == 0 and position.step < total:
                last_eval = evaluate_loss(model, eval_data, cfg, run, world)
                log({"step": position.step, **last_eval})
            epoch_done = position.batch >= len(batches)
            if epoch_done:
                position.epoch, position.batch = position.epoch + 1, 0
            if cfg.save_every and position.step % cfg.save_every == 0 and position.step < total:
                save()
            signum = world.max(stop.signum or 0)  # a signal to any rank stops all at this step
            if signum and position.step < total:
                folder = save() or checkpoints / f"step-{position.step}"
                name = signal.Signals(signum).name
                raise TrainingInterrupted(
                    f"{name} received: stopped after step {position.step} of {total} and saved {folder}; "
                    "continue with the same command plus --resume", signum)
            if epoch_done:
                break  # the next epoch has its own order
    if eval_data is not None:
        last_eval = evaluate_loss(model, eval_data, cfg, run, world)
        log({"step": position.step, **last_eval})
    save()
    elapsed = time.perf_counter() - start
    return {**last_eval, "steps": position.step, "steps_run": steps_run, "skipped_steps": position.skipped,
            "tokens": tokens_seen, "train_s": elapsed, "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            "train_loss": loss}
