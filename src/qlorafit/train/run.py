"""run_training: from a RunConfig to a trained adapter, its metrics, loss curve and checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import RunConfig, fingerprint, save_config
from ..data.dataset import load_dataset
from ..data.sources import read_data
from ..errors import QlorafitError, cannot_write
from ..faults import reached
from ..fileio import atomic_write
from ..lora.inject import add_lora
from ..lora.peft_io import save_adapter
from ..models.checkpoint import resolve_model
from ..models.load import load_model
from ..models.numerics import resolve_device
from ..plan import device_memory, plan, shape_from_config
from ..sysmem import peak_rss_bytes, rss_bytes
from .distributed import digest_of, init_world
from .fsdp import LayerSharder, code_bytes
from .loop import Run, enable_grad_checkpointing, train
from .plot import plot_losses
from .tracking import Trackers, check_installed

logger = logging.getLogger(__name__)
_RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter", "loss.png", "summary.json", "optimizer-pages",
              "tensorboard", "mlruns", "wandb")


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over another run unless resuming or told to overwrite it.

    Everything a run writes stays inside `output_dir`: a run file or folder that is a symbolic
    link (which would send checkpoints, adapters or deletions elsewhere) is refused.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise QlorafitError(f"{output_dir}: is a file, not a folder; choose another output_dir")
    links = [name for name in _RUN_FILES if (output_dir / name).is_symlink()]
    if links:
        raise QlorafitError(
            f"{output_dir}: {', '.join(links)} is a symbolic link; a run only writes inside its output_dir, "
            "remove the link or choose another output_dir"
        )
    if not output_dir.exists() or not any(output_dir.iterdir()) or resume:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise cannot_write(output_dir, exc, "choose an output_dir in a folder you can write to") from exc
        return
    if not overwrite:
        raise QlorafitError(
            f"{output_dir}: already holds another run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir"
        )
    foreign = [p.name for p in output_dir.iterdir() if p.name not in _RUN_FILES]
    if foreign:
        raise QlorafitError(
            f"{output_dir}: --overwrite refused, the folder holds files that are not from a run ({', '.join(foreign[:5])})"
        )
    for name in _RUN_FILES:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _available(kind: str, processes: int) -> int:
    """Bytes one process may use: a GPU each, or a share of this machine's memory."""
    if kind == "cuda":
        return device_memory(kind)
    return (device_memory(kind) + rss_bytes() * processes) // processes


def _kind(model) -> str:
    return "cuda" if next(model.parameters()).device.type == "cuda" else "cpu"


def _plan(config: RunConfig, model_config, mode: str, kind: str, available: int, devices: int = 1):
    """The planner's memory for this run's settings with checkpointing `mode`, data parallel on `devices`."""
    return plan(shape_from_config(model_config), method="lora" if config.quant.type == "none" else "qlora",
                batch=config.train.batch_size, seq=config.data.max_length, rank=config.lora.r,
                optimizer=config.train.optimizer, grad_checkpointing=False if mode == "off" else mode, device=kind,
                available=available, dropout=config.lora.dropout, double_quant=config.quant.double_quant,
                blocksize=config.quant.blocksize, devices=devices, strategy="ddp")


def use_grad_checkpointing(config: RunConfig, model, processes: int = 1) -> str:
    """"off", "full" or "selective": the config's choice; for `auto`, the least recomputation that
    fits (in a 1/`processes` share of this machine's memory on CPUs)."""
    choice = config.train.grad_checkpointing
    if choice != "auto":
        return {True: "full", False: "off"}.get(choice, choice)
    kind = _kind(model)
    available = _available(kind, processes)
    for mode in ("off", "selective"):
        result = _plan(config, model.config, mode, kind, available)
        logger.info("grad_checkpointing auto: %.2f GiB planned with %s, %.2f GiB available", result.total / 2**30,
                    mode, available / 2**30)
        if result.fits:
            return mode
    return "full"


def choose_strategy(config: RunConfig, devices: int, processes: int) -> str:
    """"ddp" or "fsdp" for `devices` processes (`processes` of them on this machine): the config's
    choice; for `auto`, ddp when the memory planner says the whole base fits each device (with
    the config's checkpointing, full when auto), else fsdp. Decided from the model's config alone,
    before loading, so that an fsdp run never holds the whole base."""
    choice = config.train.distributed
    if choice != "auto":
        return choice
    if config.quant.type == "none":
        return "ddp"  # fsdp shards 4-bit codes
    source = resolve_model(config.model, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    kind = resolve_device("auto").type
    available = _available(kind, processes)
    gc = config.train.grad_checkpointing
    mode = "full" if gc in ("auto", True) else "off" if gc is False else gc
    result = _plan(config, source.config, mode, kind, available, devices)
    logger.info("distributed auto: %.2f GiB planned per device with ddp, %.2f GiB available", result.total / 2**30,
                available / 2**30)
    return "ddp" if result.fits else "fsdp"


def run_training(config: RunConfig, resume: bool = False, overwrite: bool = False,
                 on_log: Callable[[dict], None] | None = None, allow_config_change: bool = False) -> dict:
    """Load, adapt, train and save as the config says; returns paths and the final eval metrics.

    Under torchrun (or in a process group the caller started) every rank calls this: each
    loads and quantizes the base, the ranks check that they hold the same weights and adapter,
    share each step's micro-batches, and rank 0 alone writes files (`distributed.py`).
    `resume` refuses a checkpoint saved under another configuration or training data unless
    `allow_config_change` (the result is then not the uninterrupted run's).
    """
    world = init_world(config.train.distributed_timeout)
    try:
        return _run(config, resume, overwrite, on_log, world, allow_config_change)
    finally:
        world.close()


def _run(config: RunConfig, resume: bool, overwrite: bool, on_log, world, allow_config_change: bool) -> dict:
    out = Path(config.output_dir)
    d = config.data
    check_installed(config.report_to)
    train_records, eval_records, train_name, eval_name = read_data(d, config.train.seed)  # bad data: nothing written
    world.on_main(lambda: prepare_output_dir(out, resume, overwrite))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))  # sharing this machine's memory
    strategy = world.broadcast(choose_strategy(config, world.size, processes) if world.main else None) \
        if world.size > 1 else "single"  # rank 0 decides: the ranks' free memory differs
    # every rank hashes each decoder layer as it loads (and under fsdp keeps only its shard)
    layers = LayerSharder(world.device, world.size, shard=strategy == "fsdp") if world.size > 1 else None
    torch.manual_seed(config.train.seed)
    q = config.quant
    model, tokenizer = load_model(config.model, quant=q.type, double_quant=q.double_quant, blocksize=q.blocksize,
                                  compute_dtype=q.compute_dtype, allow_pickle=config.allow_pickle,
                                  trust_remote_code=config.trust_remote_code, on_layer=layers)
    if tokenizer is None:
        raise QlorafitError(f"{config.model}: has no tokenizer files, which training needs")
    lc = config.lora
    add_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets, rslora=lc.rslora)
    if layers is not None:
        world.check_same(layers.model_digest(model), "quantized base weights or initial adapters")
        world.lockstep = strategy == "fsdp"  # every rank joins every gather of the sharded codes
        local, total = code_bytes(model)
        logger.info("%s: this rank holds %.1f of %.1f MiB of 4-bit codes", strategy, local / 2**20, total / 2**20)
    mode = world.broadcast(use_grad_checkpointing(config, model, processes) if world.main else None)
    if mode != "off":
        enable_grad_checkpointing(model, selective=mode == "selective")
    train_data = load_dataset(train_records, tokenizer, max_length=d.max_length, train_on=d.train_on, name=train_name)
    eval_data = None if eval_records is None else load_dataset(eval_records, tokenizer, max_length=d.max_length,
                                                               train_on=d.train_on, name=eval_name)
    world.on_main(lambda: save_config(config, out / "config.yaml"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trackers = Trackers(config.report_to if world.main else [], out, config.model_dump())

    def report(row: dict) -> None:
        trackers(row)
        if on_log is not None:
            on_log(row)

    run = Run(out, pad_id, d.max_length, d.packing, report if world.main else None, fingerprint(config),
              allow_config_change)
    try:
        metrics = train(model, train_data, eval_data, config.train, run, resume=resume, world=world)
    finally:
        trackers.close()
    world.check_same(digest_of([(n, p) for n, p in model.named_parameters() if p.requires_grad]), "trained adapters")
    summary = {"adapter": str(out / "adapter"), "metrics": str(out / "metrics.jsonl"), "plot": str(out / "loss.png"),
               "model": config.model, "eval_data": eval_name if config.data.eval else None, "train_examples": len(train_data.examples),
               "truncated": train_data.truncated, "processes": world.size, **metrics,
               "peak_rss_mib": peak_rss_bytes() / 2**20}
    if torch.cuda.is_available() and _kind(model) == "cuda":
        summary["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20

    def finish() -> None:
        save_adapter(model, out / "adapter", base_model_name_or_path=config.model)
        reached("final-save")  # a test may kill the process here: adapter written, summary not yet
        tokenizer.save_pretrained(str(out / "adapter"))
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))

    world.on_main(finish)
    return summary
