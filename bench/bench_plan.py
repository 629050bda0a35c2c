"""The memory planner against measured peak RSS, on SmolLM2-135M-Instruct.

For each setting, a fresh subprocess loads the model as qlorafit trains it (NF4 or float32
base, LoRA r on all linear layers, dropout 0.05, torch AdamW or our 8-bit AdamW, checkpointing
on or off) and runs `--steps` optimizer steps on random token batches whose first half is
masked as a prompt. Its peak RSS (VmHWM, the whole process from start to end) is compared
with `qlorafit.plan.plan(...)` for the same setting. Then the planner is run on the QLoRA
paper's Llama sizes for comparison with the paper's published figures.

    .venv/bin/python bench/bench_plan.py [--steps 2]
    -> bench/out/plan.json, bench/out/plan.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT  # bench/common.py

OUT = ROOT / "bench" / "out"
MiB = 1024 * 1024
GiB = 1024**3

# (method, batch, seq, grad_checkpointing, optimizer, rank)
SETTINGS = [
    ("qlora", 4, 256, False, "adamw", 16),
    ("qlora", 4, 256, True, "adamw", 16),
    ("lora", 4, 256, False, "adamw", 16),
    ("lora", 4, 256, True, "adamw", 16),
    ("qlora", 2, 512, False, "adamw", 16),
    ("qlora", 8, 512, True, "adamw", 16),
    ("qlora", 8, 128, False, "adamw8bit", 64),
    ("qlora", 1, 1024, True, "adamw8bit", 64),
]

# The QLoRA paper (Dettmers et al. 2023): memory of the 4-bit Guanaco/LLaMA models (Table 1,
# "Mem"), and "finetuning a 65B parameter model ... <48GB of GPU memory".
PAPER_4BIT_GB = {"7B": (6.7e9, 5), "13B": (13.0e9, 10), "33B": (32.5e9, 21), "65B": (65.2e9, 41)}


def worker(method: str, batch: int, seq: int, ckpt: bool, optimizer: str, rank: int, steps: int, model_dir: str) -> dict:
    import torch

    from qlorafit import add_lora, load_model
    from qlorafit.train.loop import enable_grad_checkpointing, train_step
    from qlorafit.train.optim import AdamW

    model, _ = load_model(model_dir, quant="none" if method == "lora" else "nf4", compute_dtype="float32")
    add_lora(model, r=rank, alpha=2 * rank, dropout=0.05)
    if ckpt:
        enable_grad_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4) if optimizer == "adamw" else AdamW(params, lr=2e-4, bits=8)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        train_step(model, opt, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}], 1.0)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"peak_rss": hwm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", type=int)
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(*SETTINGS[args.worker], args.steps, args.model_dir)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train import prepare

    from qlorafit.plan import parse_device, plan, shape_from_config, shape_from_params

    work = OUT / "train"
    work.mkdir(parents=True, exist_ok=True)
    model_dir, _ = prepare(work, 8)
    from transformers import AutoConfig

    shape = shape_from_config(AutoConfig.from_pretrained(model_dir), "SmolLM2-135M-Instruct")
    rows = []
    for i, (method, batch, seq, ckpt, optimizer, rank) in enumerate(SETTINGS):
        cmd = [sys.executable, __file__, "--worker", str(i), "--steps", str(args.steps), "--model-dir", str(model_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
        p = plan(shape, method=method, batch=batch, seq=seq, rank=rank, optimizer=optimizer,
                 grad_checkpointing=ckpt, device="cpu", available=64 * GiB)
        row = {"method": method, "batch": batch, "seq": seq, "ckpt": ckpt, "optimizer": optimizer, "rank": rank,
               "measured_mib": measured / MiB, "planned_mib": p.total / MiB, "error": p.total / measured - 1}
        rows.append(row)
        print(f"{method:5s} {batch}x{seq:<5d} ckpt={'on ' if ckpt else 'off'} {optimizer:9s} r={rank:<3d} "
              f"measured {row['measured_mib']:6.0f} MiB  planned {row['planned_mib']:6.0f} MiB  "
              f"error {100 * row['error']:+.1f}%", flush=True)
    paper = []
    for name, (n, gb) in PAPER_4BIT_GB.items():
        s = shape_from_params(n)
        weights = plan(s, method="qlora", batch=1, seq=512, rank=64, optimizer="paged_adamw", grad_checkpointing=True,
                       device="cuda:80GB")
        paper.append({"model": name, "paper_gb": gb, "frozen_weights_gb": weights.rows["frozen weights"] / 1e9,
                      "finetune_total_gb": weights.total / 1e9,
                      "fits_48gb": weights.total <= parse_device("cuda:48GB")[1],
                      "fits_24gb": weights.total <= parse_device("cuda:24GB")[1]})
    lines = ["| method | batch x seq | checkpointing | optimizer | r | measured peak RSS MiB | planned MiB | error |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch']} x {r['seq']} | {'on' if r['ckpt'] else 'off'} | {r['optimizer']} "
                     f"| {r['rank']} | {r['measured_mib']:.0f} | {r['planned_mib']:.0f} | {100 * r['error']:+.1f}% |")
    lines += ["", "| Llama size | paper, 4-bit model GB | planned frozen weights GB | planned QLoRA fine-tuning GB "
                  "(batch 1 x 512, r=64, checkpointing, paged AdamW, bf16) | fits 48 GB | fits 24 GB |",
              "|---|---:|---:|---:|---|---|"]
    for r in paper:
        lines.append(f"| {r['model']} | {r['paper_gb']} | {r['frozen_weights_gb']:.1f} | {r['finetune_total_gb']:.1f} "
                     f"| {'yes' if r['fits_48gb'] else 'no'} | {'yes' if r['fits_24gb'] else 'no'} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (OUT / "plan.md").write_text(table)
    (OUT / "plan.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows, "paper": paper}, indent=1))


if __name__ == "__main__":
    main()
