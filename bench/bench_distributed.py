"""Scaling over processes: qlorafit under torchrun next to accelerate + peft + bitsandbytes DDP, same job.

Both stacks train SmolLM2-135M-Instruct with QLoRA (NF4, double quantization, float32 compute),
LoRA r=16 alpha=32 dropout 0.05 on all linear layers, AdamW lr 2e-4, gradient clipping at 1.0
and full activation checkpointing, on a global step of 4 micro-batches of 2 x 256 tokens
(bench_train's chat records). Each stack is launched by torchrun with 1 and with 2 processes;
the machine's cores are shared out (OMP_NUM_THREADS = cores / processes), so on this 2-core
machine 2 processes do the same arithmetic as 1 with the same total threads: the figure
measured is the cost of going distributed (collectives, a second copy of the model), which is
what a user pays before adding machines.

- qlorafit: `train_step` with the `World` from `init_world` (micro-batches shared round-robin,
  LoRA gradients all-gathered in micro-batch order); `--strategy fsdp` adds FSDP2 sharding of the
  4-bit codes.
- peer: transformers + bitsandbytes NF4 + peft's `prepare_model_for_kbit_training` and
  `get_peft_model`, wrapped by `accelerate.Accelerator(gradient_accumulation_steps=...)`
  (DistributedDataParallel over gloo; gradients all-reduced on the last micro-batch).

Per run: median step time over the steps after warm-up (rank 0's clock, after a barrier),
global tokens/s, and the peak RSS of each rank (VmHWM).

    .venv/bin/python bench/bench_distributed.py [--steps 6] [--warmup 2] [--procs 1,2]
    -> bench/out/distributed.json, bench/out/distributed.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, src_digest  # bench/common.py

OUT = ROOT / "bench" / "out"
MICRO, ACCUM, SEQ, RANK, ALPHA, DROPOUT, LR = 2, 4, 256, 16, 32.0, 0.05, 2e-4


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _micro_batches(batches_file: str, step: int) -> list[dict]:
    """The ACCUM micro-batches (MICRO x SEQ each) of global step `step`, cut from bench_train's 4 x 256 batches."""
    from safetensors.torch import load_file

    data = load_file(batches_file)
    rows = {k: v.reshape(-1, v.shape[-1]) for k, v in data.items()}
    n = rows["input_ids"].shape[0]
    out = []
    for j in range(ACCUM):
        start = ((step * ACCUM + j) * MICRO) % n
        out.append({k: v[start : start + MICRO] for k, v in rows.items()})
    return out


def _ours(model_dir: str, strategy: str):
    import torch

    from qlorafit import add_lora, load_model
    from qlorafit.train.distributed import dropout_seed, init_world
    from qlorafit.train.fsdp import LayerSharder
    from qlorafit.train.loop import enable_grad_checkpointing, train_step

    world = init_world()
    torch.manual_seed(0)
    sharder = LayerSharder(world.device, world.size, shard=strategy == "fsdp") if world.size > 1 else None
    model, _ = load_model(model_dir, quant="nf4", compute_dtype="float32", on_layer=sharder)  # as `qlorafit train`
    world.lockstep = strategy == "fsdp" and world.size > 1
    add_lora(model, r=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear")
    enable_grad_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(i: int, micro: list[dict]) -> float:
        seeds = [dropout_seed(0, i, j) for j in range(len(micro))]
        return train_step(model, opt, micro, 1.0, world, seeds=seeds)[0]

    return world.rank, world.size, step, world


def _peer(model_dir: str, strategy: str):
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    acc = Accelerator(gradient_accumulation_steps=ACCUM // world_size, cpu=True)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=q)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    model, opt = acc.prepare(model, opt)
    model.train()

    def step(i: int, micro: list[dict]) -> float:
        total = 0.0
        for batch in micro[acc.process_index :: acc.num_processes]:
            with acc.accumulate(model):
                loss = model(**batch, use_cache=False).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            total += float(loss)
        return total

    class _World:
        def barrier(self):
            acc.wait_for_everyone()

        def gather(self, obj):
            import torch.distributed as dist

            if not dist.is_initialized():
                return [obj]
            out = [None] * dist.get_world_size()
            dist.all_gather_object(out, obj)
            return out

    return acc.process_index, acc.num_processes, step, _World()


def worker(stack: str, model_dir: str, batches_file: str, steps: int, warmup: int, strategy: str) -> None:
    import torch
    import torch.distributed as dist

    start = time.perf_counter()
    rank, size, step, world = (_ours if stack == "qlorafit" else _peer)(model_dir, strategy)
    load_s = time.perf_counter() - start
    peak_load = _hwm_mib()
    times = []
    for i in range(warmup + steps):
        micro = _micro_batches(batches_file, i)
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        step(i, micro)
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t)
    result = {"rank": rank, "peak_rss_mib": _hwm_mib(), "peak_load_mib": peak_load, "load_s": load_s,
              "step_s": times[warmup:],
              "threads": torch.get_num_threads()}
    results = [result]
    if dist.is_initialized():
        results = [None] * size
        dist.all_gather_object(results, result)
    if rank == 0:
        print(json.dumps({"stack": stack, "procs": size, "strategy": strategy, "ranks": results}))


def run(python: Path, stack: str, procs: int, strategy: str, model_dir: Path, batches: Path, steps: int,
        warmup: int) -> dict:
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    if stack == "qlorafit":
        env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", __file__,
           "--worker", stack, "--model-dir", str(model_dir), "--batches", str(batches), "--steps", str(steps),
           "--warmup", str(warmup), "--strategy", strategy]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{stack} x{procs} failed:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> list[dict]:
    tokens = ACCUM * MICRO * SEQ
    rows = []
    for r in runs:
        step = statistics.median(r["ranks"][0]["step_s"])
        rows.append({"stack": r["stack"], "procs": r["procs"], "strategy": r["strategy"], "s_per_step": step,
                     "tokens_per_s": tokens / step, "peak_rss_mib_per_rank": max(x["peak_rss_mib"] for x in r["ranks"]),
                     "load_s": max(x["load_s"] for x in r["ranks"]), "threads": r["ranks"][0]["threads"]})
    peer = {row["procs"]: row for row in rows if row["stack"] == "peer"}
    for row in rows:
        if row["stack"] == "qlorafit" and row["procs"] in peer:
            p = peer[row["procs"]]
            row["speed_vs_peer"] = row["tokens_per_s"] / p["tokens_per_s"]
            row["rss_vs_peer"] = row["peak_rss_mib_per_rank"] / p["peak_rss_mib_per_rank"]
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct QLoRA (NF4 + double quantization, fp32 compute), r={RANK}, full checkpointing; "
        f"global step {ACCUM} x {MICRO} x {SEQ} tokens; median of {info['steps']} steps after {info['warmup']} "
        f"warm-up; {info['cores']} cores shared out among the processes.",
        "",
        "| stack | processes | strategy | threads each | s/step | tokens/s | peak RSS per rank MiB | load s "
        "| speed vs peer | RSS vs peer |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = (f"{r['speed_vs_peer']:.2f}x", f"{r['rss_vs_peer']:.2f}x") if "speed_vs_peer" in r else ("", "")
        lines.append(f"| {r['stack']} | {r['procs']} | {r['strategy'] if r['stack'] == 'qlorafit' else 'ddp'} "
                     f"| {r['threads']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {r['peak_rss_mib_per_rank']:.0f} | {r['load_s']:.1f} | {vs[0]} | {vs[1]} |")
    return "\n".join(lines) + "\n"


def load_only(model_dir: Path, batches: Path) -> None:
    """Peak RSS per rank of loading `model_dir` on 2 processes, whole (ddp) and sharded while loading (fsdp)."""
    rows = []
    for strategy in ("ddp", "fsdp"):
        r = run(Path(sys.executable), "qlorafit", 2, strategy, model_dir, batches, 0, 0)
        rows.append({"strategy": strategy, "peak_load_mib": max(x["peak_load_mib"] for x in r["ranks"]),
                     "load_s": max(x["load_s"] for x in r["ranks"])})
        print(f"{strategy}: peak RSS per rank while loading {rows[-1]['peak_load_mib']:.0f} MiB, "
              f"{rows[-1]['load_s']:.0f} s", flush=True)
    (OUT / "distributed-load.json").write_text(json.dumps({"model": str(model_dir), "rows": rows,
                                                           "date": time.strftime("%Y-%m-%d"), "src": src_digest()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--stacks", default="qlorafit,peer")
    parser.add_argument("--load-only", metavar="FOLDER",
                        help="only load this model on 2 processes with ddp and with fsdp: peak RSS per rank")
    parser.add_argument("--worker")
    parser.add_argument("--model-dir")
    parser.add_argument("--batches")
    parser.add_argument("--strategy", default="ddp")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.batches, args.steps, args.warmup, args.strategy)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train import ensure_peer_venv, prepare

    work = OUT / "train"
    work.mkdir(parents=True, exist_ok=True)
    model_dir, batches = prepare(work, 8)
    if args.load_only:
        load_only(Path(args.load_only), batches)
        return
    stacks = args.stacks.split(",")
    peer_python = ensure_peer_venv() if "peer" in stacks else None
    runs = []
    for procs in (int(p) for p in args.procs.split(",")):
        plans = [("qlorafit", "ddp")] + ([("qlorafit", "fsdp")] if procs > 1 else []) + [("peer", "ddp")]
        for stack, strategy in plans:
            if stack not in stacks:
                continue
            python = Path(sys.executable) if stack == "qlorafit" else peer_python
            r = run(python, stack, procs, strategy, model_dir, batches, args.steps, args.warmup)
            print(f"{stack:9s} x{procs} {strategy}: {statistics.median(r['ranks'][0]['step_s']):.2f} s/step, "
                  f"peak RSS per rank {max(x['peak_rss_mib'] for x in r['ranks']):.0f} MiB", flush=True)
            runs.append(r)
    info = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "warmup": args.warmup,
            "cores": len(os.sched_getaffinity(0)), "src": src_digest(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    rows = summarize(runs)
    table = markdown(rows, info)
    (OUT / "distributed.md").write_text(table)
    (OUT / "distributed.json").write_text(json.dumps({"info": info, "runs": runs, "rows": rows}, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
