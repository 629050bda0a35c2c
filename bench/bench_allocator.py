"""The allocator lever: qlorafit's QLoRA training step under glibc malloc, tuned glibc, jemalloc, tcmalloc, mimalloc.

The step is bench_train.py's `qlorafit-qlora` stack (SmolLM2-135M-Instruct, 4 x 256 tokens, LoRA
r=16 on every linear layer, AdamW), with gradient checkpointing on and off; each allocator is put
in front of the process with LD_PRELOAD (or MALLOC_* settings for glibc). Each (allocator,
checkpointing) pair runs in a fresh subprocess, round-robin over `--repeats`; the table gives the
median s/step and the peak RSS (VmHWM).

    .venv/bin/python bench/bench_allocator.py [--steps 6] [--warmup 2] [--repeats 2]
    -> bench/out/allocator.json and a markdown table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_train import OUT, prepare, run_one  # bench/bench_train.py: the same step and batches
from common import src_digest

from qlorafit.allocator import ALLOCATORS, find_allocator

GLIBC_TUNED = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"}


def settings() -> dict[str, dict[str, str]]:
    """Allocator name -> the environment that selects it (the ones found on this machine)."""
    found = {"glibc": {}, "glibc-tuned": GLIBC_TUNED}
    for name in ALLOCATORS:
        library = find_allocator(name)
        if library is not None:
            found[name] = {"LD_PRELOAD": str(library)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = OUT / "train"
    work.mkdir(parents=True, exist_ok=True)
    model_dir, batches = prepare(work, args.steps + args.warmup)
    envs = settings()
    runs = []
    for rep in range(args.repeats):
        for name, env in envs.items():
            for ckpt in (True, False):
                # the process's own allocator choice is off: the environment here decides
                r = run_one(Path(sys.executable), "qlorafit-qlora", ckpt, model_dir, batches, args.steps, args.warmup,
                            {**env, "QLORAFIT_ALLOCATOR": "system"})
                r["allocator"] = name
                runs.append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:12s} ckpt={'on ' if ckpt else 'off'} "
                      f"{statistics.median(r['step_s']):6.2f} s/step  peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
    lines = ["| allocator | checkpointing | s/step | peak RSS MiB |", "|---|---|---:|---:|"]
    for name in envs:
        for ckpt in (True, False):
            mine = [r for r in runs if r["allocator"] == name and r["ckpt"] == ckpt]
            step = statistics.median(t for r in mine for t in r["step_s"])
            peak = statistics.median(r["peak_rss_mib"] for r in mine)
            lines.append(f"| {name} | {'on' if ckpt else 'off'} | {step:.2f} | {peak:.0f} |")
    print("\n".join(lines))
    info = {"date": time.strftime("%Y-%m-%d"), "src": src_digest(), "command": " ".join(sys.argv), "envs": envs}
    (OUT / "allocator.json").write_text(json.dumps({"info": info, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
