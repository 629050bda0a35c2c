"""Big models on small hardware: QLoRA training of a 1.1B or 7B Llama, measured through the CLI.

Writes, once, a random-weight Llama as a sharded bfloat16 Hugging Face folder under bench/out/
(TinyLlama-1.1B shapes for `--size 1b`, Llama-2-7B shapes for `--size 7b`, a ~20M model for
`--size tiny`; shards of ~2 GB, written tensor by tensor so the writer never holds more than one
shard; weights normal with std 0.02, norms ones), with a byte-level BPE tokenizer whose vocabulary
is exactly 32000 entries (256 bytes, plain filler tokens, the ChatML specials) and a ChatML chat
template. Then, on `--batch` x `--seq` tokens of chat records (loss on the assistant tokens only):

- ours: the real command line in a subprocess, `qlorafit train run.yaml`: NF4 with double
  quantization, float32 compute, LoRA r=16 alpha 32 dropout 0.05 on all linear layers, AdamW
  lr 2e-4, gradient checkpointing on (`--ckpt off` turns it off), log every step, no eval.
- peer: transformers + bitsandbytes NF4 (double quant, float32 compute dtype) +
  peft.prepare_model_for_kbit_training + get_peft_model with the same LoRA, torch AdamW lr 2e-4,
  clipping at 1.0, gradient checkpointing with use_reentrant=False; in bench/.venv-peer (created
  from PyPI on first use, see bench_train.py). It trains on the very batches ours trains on: the
  token ids and labels come from qlorafit's data pipeline, in qlorafit's batch order, saved to a
  safetensors file that the peer reads.
- plan: `qlorafit plan --model <folder> --seq --batch --rank [--grad-checkpointing]`, whose total
  MiB is printed next to the measured peaks.

How each number is taken (the same way for both stacks):

- s/step: median over steps 2..N of the step times; ours from metrics.jsonl (the difference of
  consecutive `elapsed_s`), the peer's timed around each step.
- load s: from the launch of the process to the start of the first training step (imports, reading
  and quantizing the weights, adding LoRA, the optimizer; ours also tokenizes the JSONL). Ours:
  when the first line of metrics.jsonl appears (polled every 20 ms) minus that line's `elapsed_s`
  (the first step); the peer reports the wall-clock time at which its first step starts.
- peak RSS: each stack runs under a minimal launcher (`python -I -S`) that forks, execs the stack
  and reads the child's `ru_maxrss` from `os.wait4`: the stack's own high-water mark (a floor of the
  launcher's ~10 MiB RSS at fork time, which is recorded), not the driver's.
- A stack that fails (out of memory, killed) is recorded as "did not fit" or "failed" with its
  exit code and the end of its log, and the other stack still runs.

    .venv/bin/python bench/bench_scale.py --size tiny --steps 3          # development, ~1 min
    .venv/bin/python bench/bench_scale.py --quick                        # 1b, 3 steps
    .venv/bin/python bench/bench_scale.py --size 1b [--steps 5] [--seq 256] [--batch 1] [--rank 16]
    .venv/bin/python bench/bench_scale.py --size 7b [--ckpt off] [--stacks ours,peer]
    make bench-scale                                                     # 1b, then 7b
    -> bench/out/scale-<size>.json (scale-<size>-ckpt-off.json with --ckpt off), a markdown table
       on stdout; the model folder bench/out/scale-model-<size>/ is kept and reused; the data, run
       config, logs and our run's output_dir are in bench/out/scale-<size>/.

Step times are only meaningful on otherwise idle cores: with another busy process, torch's threads
wait for each other and a step can take 10x longer (the share of the CPUs busy with other work at
the start is measured, recorded and warned about).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_train import ALPHA, DROPOUT, LR, chat_records, ensure_peer_venv  # bench/bench_train.py
from common import ROOT, run_worker, src_digest  # bench/common.py

OUT = ROOT / "bench" / "out"
MiB = 1024 * 1024
VOCAB = 32000
SHARD_BYTES = 2 * 10**9
SHAPES = {
    # TinyLlama-1.1B
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=2048),
    # Llama-2-7B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096),
    # ~19M parameters (most of them the embeddings and the LM head), for development
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=2048),
}
# tiny gets small shards, so that the sharded layout (index + several files) is exercised too
SHARD_LIMIT = {"1b": SHARD_BYTES, "7b": SHARD_BYTES, "tiny": 16 * MiB}

# Runs a command, waits for it with os.wait4 and writes its exit code and rusage to argv[1] as JSON.
# It is tiny on purpose: a child's ru_maxrss starts from the RSS of the process it was forked from.
LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
with open("/proc/self/status") as f:
    own = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
t0 = time.time()
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss, "launcher_rss_kib": own,
               "start_time": t0, "wall_s": time.time() - t0, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, f)
"""


# --------------------------------------------------------------------------- model folder (our venv, a worker)


def byte_tokenizer_32k():
    """tests/conftest.py's byte-level BPE (no merges, ChatML specials), padded to exactly 32000 entries.

    The fillers are ordinary (not special) vocabulary entries that the tokenizer never produces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from qlorafit.data.render import CHATML_TEMPLATE, CHATML_TOKENS

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    for i in range(len(vocab), VOCAB - len(CHATML_TOKENS)):
        vocab[f"<filler_{i}>"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tok.chat_template = CHATML_TEMPLATE
    assert len(tok) == VOCAB, len(tok)
    return tok


def tensor_plan(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama with config `c`, in file order."""
    h, f, v = c["hidden_size"], c["intermediate_size"], VOCAB
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    names = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                  (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                  (p + "mlp.down_proj.weight", (h, f))]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_model(size: str, folder: Path) -> dict:
    """Write the random bf16 Llama and its tokenizer to `folder`, one shard in memory at a time."""
    import math

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = byte_tokenizer_32k()
    c = SHAPES[size]
    config = LlamaConfig(**c, vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))

    shards, current, used = [], [], 0  # group the tensors into shards of at most SHARD_LIMIT bytes
    for name, shape in tensor_plan(c):
        nbytes = math.prod(shape) * 2
        if current and used + nbytes > SHARD_LIMIT[size]:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += nbytes
    shards.append(current)

    gen = torch.Generator().manual_seed(0)
    weight_map, total, start = {}, 0, time.perf_counter()
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {"folder": str(folder), "shards": len(shards), "bytes": total, "write_s": time.perf_counter() - start}


def ensure_model(size: str) -> Path:
    folder = OUT / f"scale-model-{size}"
    if (folder / "model.safetensors.index.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    print(f"writing {folder} (once) ...", flush=True)
    r = run_worker(__file__, "write-model", [size, str(folder)])
    if "error" in r:
        raise SystemExit(f"writing the model failed:\n{r['error']}")
    print(f"  {r['shards']} shards, {r['bytes'] / 2**30:.2f} GiB in {r['write_s']:.0f} s", flush=True)
    return folder


# --------------------------------------------------------------------------- data (our venv, a worker)


def scale_records(n: int, seq: int) -> list[dict]:
    """bench_train's chat records, cut for a byte-level tokenizer (~1 token per character): a question
    of about seq/4 characters and an answer of at least seq characters, so every record fills `seq`
    tokens and keeps most of them labelled."""
    records = []
    for i, r in enumerate(chat_records(n, seed=0)):
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        question = question[: max(16, seq // 4)].rsplit(" ", 1)[0] + "?"
        extra = chat_records(1 + seq // 1000, seed=1000 + i)
        while len(answer) < seq + 16:
            answer += " " + extra.pop()["messages"][1]["content"]
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return records


def prepare_data(folder: str, jsonl: str, batches_file: str, steps: int, batch: int, seq: int) -> dict:
    """The JSONL that ours reads, and the same batches (qlorafit's tokens, labels and order) for the peer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qlorafit.data.batches import batch_order, pad_batch
    from qlorafit.data.dataset import load_dataset

    n = steps * batch
    Path(jsonl).write_text("".join(json.dumps(r) + "\n" for r in scale_records(n, seq)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = load_dataset(jsonl, tokenizer, max_length=seq)
    short = [len(e) for e in data.examples if len(e) != seq]
    if len(data.examples) != n or short:
        raise SystemExit(f"{len(data.examples)} of {n} records kept, lengths {short[:5]} below {seq}")
    # the order run_training uses in epoch 0 (train.seed 0, no packing): see train/loop.epoch_batches
    groups = batch_order(data.lengths, batch, seed=0)
    rows = [pad_batch([data.examples[i] for i in g], tokenizer.pad_token_id) for g in groups]
    tensors = {k: torch.stack([r[k] for r in rows]).contiguous() for k in ("input_ids", "attention_mask", "labels")}
    save_file(tensors, batches_file)
    labelled = int((tensors["labels"] != -100).sum())
    return {"examples": n, "tokens": int(tensors["attention_mask"].sum()), "labelled_tokens": labelled}


# --------------------------------------------------------------------------- peer worker (bench/.venv-peer)


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def peer_worker(folder: str, batches_file: str, rank: int, ckpt: bool, result_file: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    t = time.perf_counter()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant)
    from_pretrained_s = time.perf_counter() - t
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    data = load_file(batches_file)
    rss_loaded = _vm("VmRSS")
    first_step_at, times, losses = None, [], []
    for i in range(data["input_ids"].shape[0]):
        batch = {k: v[i] for k, v in data.items()}
        if first_step_at is None:
            first_step_at = time.time()
        t = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    result = {"first_step_at": first_step_at, "from_pretrained_s": from_pretrained_s, "step_s": times,
              "losses": losses, "rss_loaded_mib": rss_loaded, "vmhwm_mib": _vm("VmHWM"),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path(result_file).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def launch(cmd: list[str], log: Path, watch: Path | None = None) -> dict:
    """Run `cmd` under the rusage launcher, output to `log`; with `watch`, also when that file got its first line."""
    rusage_file = log.with_suffix(".rusage.json")
    rusage_file.unlink(missing_ok=True)
    seen: dict = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                if watch.stat().st_size > 0 and b"\n" in watch.read_bytes():
                    seen["t"] = time.time()
                    return
            except OSError:
                pass
            time.sleep(0.02)

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(rusage_file), *cmd],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        poller = threading.Thread(target=poll, daemon=True) if watch else None
        if poller:
            poller.start()
        proc.wait()
        done.set()
        if poller:
            poller.join()
    if proc.returncode != 0 or not rusage_file.is_file():
        return {"returncode": proc.returncode, "maxrss_kib": None, "launcher_failed": True}
    r = json.loads(rusage_file.read_text())
    if "t" in seen:
        r["first_line_at"] = seen["t"]
    return r


def _failure(r: dict, log: Path) -> dict:
    rc = r["returncode"]
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    text = "\n".join(tail)
    oom = rc in (-9, 137) or any(m in text.lower() for m in ("out of memory", "memoryerror", "can't allocate memory"))
    return {"status": "did not fit" if oom else "failed", "returncode": rc, "log_tail": text,
            "peak_rss_mib": r["maxrss_kib"] / 1024 if r.get("maxrss_kib") else None}


def _median_after_first(step_s: list[float]) -> float:
    return statistics.median(step_s[1:] if len(step_s) > 1 else step_s)


def run_ours(folder: Path, jsonl: Path, work: Path, a: argparse.Namespace, tokens_per_step: int) -> dict:
    import yaml

    out_dir = work / f"ours-run-ckpt-{a.ckpt}"
    shutil.rmtree(out_dir, ignore_errors=True)
    config = {
        "model": str(folder),
        "quant": {"type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"},
        "lora": {"r": a.rank, "alpha": ALPHA, "dropout": DROPOUT, "targets": "all-linear"},
        "data": {"train": str(jsonl), "max_length": a.seq, "train_on": "completion", "packing": False},
        "train": {"max_steps": a.steps, "batch_size": a.batch, "grad_accum": 1, "lr": LR, "optimizer": "adamw",
                  "max_grad_norm": 1.0, "grad_checkpointing": {"on": "full", "off": "off"}.get(a.ckpt, a.ckpt), "log_every": 1, "eval_every": 0,
                  "save_every": 0, "seed": 0},
        "output_dir": str(out_dir),
    }
    run_yaml = work / f"run-ckpt-{a.ckpt}.yaml"
    run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = Path(sys.executable).with_name("qlorafit")
    cmd = [str(cli), "train", str(run_yaml)]
    log = work / f"ours-ckpt-{a.ckpt}.log"
    r = launch(cmd, log, watch=out_dir / "metrics.jsonl")
    result = {"stack": "ours", "command": " ".join(cmd), "config": config, "log": str(log)}
    if r["returncode"] != 0:
        return {**result, **_failure(r, log)}
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "loss" in row]
    elapsed = [row["elapsed_s"] for row in rows]
    step_s = [elapsed[0]] + [elapsed[i] - elapsed[i - 1] for i in range(1, len(elapsed))]
    s = _median_after_first(step_s)
    load_s = r["first_line_at"] - r["start_time"] - elapsed[0] if "first_line_at" in r else None
    return {**result, "status": "ok", "load_s": load_s, "step_s": step_s, "s_per_step": s,
            "tokens_per_s": tokens_per_step / s, "peak_rss_mib": r["maxrss_kib"] / 1024,
            "launcher_rss_mib": r["launcher_rss_kib"] / 1024, "wall_s": r["wall_s"],
            "losses": [row["loss"] for row in rows]}


def run_peer(folder: Path, batches: Path, work: Path, a: argparse.Namespace, tokens_per_step: int) -> dict:
    python = ensure_peer_venv()
    result_file = work / f"peer-ckpt-{a.ckpt}.result.json"
    result_file.unlink(missing_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", "peer", "--model-dir", str(folder),
           "--batches", str(batches), "--rank", str(a.rank), "--ckpt", a.ckpt, "--result", str(result_file)]
    log = work / f"peer-ckpt-{a.ckpt}.log"
    r = launch(cmd, log)
    result = {"stack": "peer", "command": " ".join(cmd), "log": str(log)}
    if r["returncode"] != 0 or not result_file.is_file():
        return {**result, **_failure(r, log)}
    w = json.loads(result_file.read_text())
    s = _median_after_first(w["step_s"])
    return {**result, "status": "ok", "load_s": w["first_step_at"] - r["start_time"], "step_s": w["step_s"],
            "s_per_step": s, "tokens_per_s": tokens_per_step / s, "peak_rss_mib": r["maxrss_kib"] / 1024,
            "launcher_rss_mib": r["launcher_rss_kib"] / 1024, "wall_s": r["wall_s"], "losses": w["losses"],
            "from_pretrained_s": w["from_pretrained_s"], "vmhwm_mib": w["vmhwm_mib"],
            "rss_loaded_mib": w["rss_loaded_mib"], "threads": w["threads"], "torch": w["torch"]}


def run_plan(folder: Path, a: argparse.Namespace) -> dict:
    cmd = [str(Path(sys.executable).with_name("qlorafit")), "plan", "--model", str(folder), "--seq", str(a.seq),
           "--batch", str(a.batch), "--rank", str(a.rank)] + (["--grad-checkpointing"] if a.ckpt != "off" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"command": " ".join(cmd), "output": proc.stdout.strip() or proc.stderr.strip()}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("total", "available"):
            out[f"{parts[0]}_mib"] = float(parts[1].replace(",", ""))
    out["fits"] = "does NOT fit" not in proc.stdout if proc.returncode == 0 else None
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def cpu_busy(seconds: float = 1.0) -> float:
    """The fraction of all CPUs busy over the next `seconds` (from /proc/stat); 0.0 where unknown."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def markdown(results: list[dict], plan: dict, info: dict) -> str:
    shape = info["shape"]
    lines = [
        f"Random-weight Llama, {info['size']} ({info['params'] / 1e9:.2f}B parameters: hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, vocab {VOCAB}), bf16 safetensors in {info['shards']} shard(s); QLoRA NF4 "
        f"double quant, fp32 compute, LoRA r={info['rank']} alpha {ALPHA:g} all-linear, AdamW, batch {info['batch']} x "
        f"{info['seq']} tokens, gradient checkpointing {info['ckpt']}; s/step = median of steps 2..{info['steps']}. "
        f"{info['cpu']}, {info['cpu_count']} CPUs, {info['cpu_busy_before']:.0%} busy with other work at the start.",
        "",
        "| stack | load s | s/step | tokens/s | peak RSS MiB | planner MiB | peak / planner | first loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    planned = plan.get("total_mib")
    for r in results:
        p = f"{planned:,.0f}" if planned else "n/a"
        if r["status"] != "ok":
            peak = f"{r['peak_rss_mib']:,.0f}" if r.get("peak_rss_mib") else "n/a"
            lines.append(f"| {r['stack']} | {r['status']} (exit code {r['returncode']}) | | | {peak} | {p} | | |")
            continue
        load = f"{r['load_s']:.1f}" if r["load_s"] is not None else "n/a"
        ratio = f"{r['peak_rss_mib'] / planned:.2f}" if planned else ""
        lines.append(f"| {r['stack']} | {load} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mib']:,.0f} | {p} | {ratio} | {r['losses'][0]:.4f} |")
    by = {r["stack"]: r for r in results}
    if all(by.get(s, {}).get("status") == "ok" for s in ("ours", "peer")):
        o, q = by["ours"], by["peer"]
        load = f"{o['load_s'] / q['load_s']:.2f}x" if o["load_s"] is not None else "n/a"
        lines += ["", f"ours / peer: load {load}, s/step {o['s_per_step'] / q['s_per_step']:.2f}x, "
                      f"tokens/s {o['tokens_per_s'] / q['tokens_per_s']:.2f}x, "
                      f"peak RSS {o['peak_rss_mib'] / q['peak_rss_mib']:.2f}x"]
    if planned:
        lines += ["", f"planner: {planned:,.0f} MiB total, "
                      f"{'fits' if plan.get('fits') else 'does NOT fit'} in {plan.get('available_mib', 0):,.0f} MiB"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ckpt", choices=["on", "off", "selective"], default="on",
                        help="gradient checkpointing (default on = full; selective: ours keeps linear outputs, the peer "
                             "runs full checkpointing)")
    parser.add_argument("--quick", action="store_true", help="--size 1b --steps 3")
    parser.add_argument("--stacks", default="ours,peer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker == "peer":
        peer_worker(a.model_dir, a.batches, a.rank, a.ckpt != "off", a.result)
        return
    if a.worker == "write-model":
        print(json.dumps(write_model(a.args[0], Path(a.args[1]))))
        return
    if a.worker == "prepare-data":
        folder, jsonl, batches, steps, batch, seq = a.args
        print(json.dumps(prepare_data(folder, jsonl, batches, int(steps), int(batch), int(seq))))
        return
    if a.quick:
        a.size, a.steps = "1b", 3
    stacks = [s for s in a.stacks.split(",") if s]
    if not set(stacks) <= {"ours", "peer"}:
        parser.error("--stacks: a comma-separated subset of ours,peer")

    busy_before = cpu_busy()
    if busy_before > 0.2:
        print(f"warning: other processes keep {busy_before:.0%} of the CPUs busy: step times are not reliable "
              "(torch's threads wait for each other; a step can take 10x longer)", flush=True)
    folder = ensure_model(a.size)
    work = OUT / f"scale-{a.size}"
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{a.steps}x{a.batch}x{a.seq}"
    jsonl, batches = work / f"chat-{tag}.jsonl", work / f"batches-{tag}.safetensors"
    d = run_worker(__file__, "prepare-data", [str(folder), str(jsonl), str(batches), str(a.steps), str(a.batch),
                                               str(a.seq)])
    if "error" in d:
        raise SystemExit(f"preparing the data failed:\n{d['error']}")
    tokens_per_step = d["tokens"] // a.steps

    plan = run_plan(folder, a)
    results = []
    for stack in stacks:
        print(f"running {stack} ({a.size}, {a.steps} steps, batch {a.batch} x {a.seq}, ckpt {a.ckpt}) ...", flush=True)
        r = (run_ours if stack == "ours" else run_peer)(folder, jsonl if stack == "ours" else batches, work, a,
                                                         tokens_per_step)
        if r["status"] == "ok":
            print(f"  load {r['load_s'] or float('nan'):.1f} s, {r['s_per_step']:.2f} s/step, "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB, loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}", flush=True)
        else:
            print(f"  {r['status']} (exit code {r['returncode']}); log: {r['log']}", flush=True)
        results.append(r)

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "src": src_digest(), "size": a.size, "shape": SHAPES[a.size],
            "params": index["metadata"]["total_size"] // 2, "shards": len(set(index["weight_map"].values())),
            "model_dir": str(folder), "steps": a.steps, "seq": a.seq, "batch": a.batch, "rank": a.rank, "ckpt": a.ckpt,
            "tokens_per_step": tokens_per_step, "labelled_tokens": d["labelled_tokens"], "cpu": _cpu(),
            "cpu_count": os.cpu_count(), "cpu_busy_before": busy_before, "cpu_busy_after": cpu_busy(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "peak_rss": "ru_maxrss of the stack's process from os.wait4 in a minimal fork+exec launcher",
            "load_s": "process launch to the start of the first training step (ours: first metrics.jsonl line, "
                      "polled every 20 ms, minus its elapsed_s; peer: reported by the worker)"}
    table = markdown(results, plan, info)
    name = f"scale-{a.size}" + ("" if a.ckpt == "on" else f"-ckpt-{a.ckpt}")
    (OUT / f"{name}.json").write_text(json.dumps({"info": info, "plan": plan, "results": results, "table": table},
                                                 indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
