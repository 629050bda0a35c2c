"""Model loading time and peak memory: qlorafit vs transformers (and transformers + bitsandbytes).

Writes a randomly initialised Llama checkpoint (TinyLlama-1.1B shape by default, `--small` for
a ~100M model) as sharded bfloat16 safetensors under bench/out/, reusing it if present. Then each
loader runs in a fresh subprocess, so its peak RSS is its own:

- ours-nf4:  qlorafit.load_model(dir, quant="nf4")        (streams, quantizes on arrival)
- ours-none: qlorafit.load_model(dir, quant="none")       (float32)
- hf-fp32:   AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)
- hf-bnb-nf4: the same with BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, fp32 compute)

Each subprocess reports its RSS after imports (baseline), the wall time of the load, the peak
RSS (the kernel's high-water mark VmHWM, reset after the imports; getrusage's ru_maxrss; and a
psutil sampler that also tracks anonymous vs file-backed memory), and the bytes the loaded model
holds (parameters + buffers + 4-bit states). Each loader runs `--repeats` times (default 3),
round-robin; the table shows medians (min-max).

    .venv/bin/python bench/bench_load.py [--small] [--repeats N]    # prints a markdown table
    -> bench/out/load.json (load-small.json with --small)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from common import reset_peak_rss, run_worker, spread, src_digest  # bench/common.py

OUT = Path(__file__).resolve().parent / "out"
MiB = 1024 * 1024
_PROC = psutil.Process()


SHAPES = {
    # TinyLlama-1.1B: 1.10e9 parameters
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # ~100M parameters, for smoke tests
    "small": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}
METHODS = ("ours-nf4", "ours-none", "hf-fp32", "hf-bnb-nf4")


# --------------------------------------------------------------------------- checkpoint


def _layer_tensors(i: int, c: dict, gen) -> dict:
    import torch

    h, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    out = {f"model.layers.{i}.{k}": _randn(s, gen) for k, s in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def _randn(shape, gen):
    import torch

    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)


def write_checkpoint(path: Path, shape: str) -> None:
    """Write a random Llama as bf16 safetensors, one shard per decoder layer (never whole in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    c = SHAPES[shape]
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**c, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.to_json_file(tmp / "config.json")

    gen = torch.Generator().manual_seed(0)
    n_shards = c["num_hidden_layers"] + 1
    weight_map, total = {}, 0

    def save(i: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    h, v = c["hidden_size"], c["vocab_size"]
    save(
        0,
        {
            "model.embed_tokens.weight": _randn((v, h), gen),
            "lm_head.weight": _randn((v, h), gen),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        },
    )
    for i in range(c["num_hidden_layers"]):
        save(i + 1, _layer_tensors(i, c, gen))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def ensure_checkpoint(shape: str) -> tuple[Path, bool]:
    path = OUT / f"llama-{shape}-bf16"
    if (path / "model.safetensors.index.json").is_file():
        return path, False
    # In a subprocess: the driver must stay small, because a child's ru_maxrss starts from the
    # parent's RSS at fork/exec time.
    subprocess.run([sys.executable, __file__, "--write-checkpoint", shape, "--dir", str(path)], check=True)
    return path, True


# --------------------------------------------------------------------------- worker (one load)


class RssSampler(threading.Thread):
    """Polls psutil's RSS, and /proc/self/status for anonymous and file-backed RSS, keeping the peaks."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak = interval, threading.Event(), {"rss": 0, "anon": 0, "file": 0}

    @staticmethod
    def read() -> dict:
        vals = {"VmRSS": _PROC.memory_info().rss}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    vals[key] = int(rest.split()[0]) * 1024
        return {"rss": vals["VmRSS"], "hwm": vals["VmHWM"], "anon": vals["RssAnon"], "file": vals["RssFile"]}

    def run(self) -> None:
        while not self.stop.is_set():
            self.update(self.read())
            time.sleep(self.interval)

    def update(self, now: dict) -> None:
        for k in self.peak:
            self.peak[k] = max(self.peak[k], now[k])


def model_bytes(model) -> dict:
    """Bytes held by parameters + buffers (each storage once) + 4-bit quant states."""
    seen, tensor_bytes, state_bytes = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensor_bytes += t.numel() * t.element_size()
    for m in model.modules():
        state = getattr(m, "quant_state", None)  # qlorafit Linear4bit
        if state is None:
            state = getattr(getattr(m, "weight", None), "quant_state", None)  # bitsandbytes Params4bit
        if state is not None:
            state_bytes += _state_bytes(state)
    return {
        "tensor_bytes": tensor_bytes,
        "quant_state_bytes": state_bytes,
        "total_bytes": tensor_bytes + state_bytes,
    }


def _state_bytes(state) -> int:
    if hasattr(state, "nbytes"):
        return state.nbytes()
    total = state.absmax.nbytes + state.code.nbytes
    if getattr(state, "state2", None) is not None:
        total += _state_bytes(state.state2) + 4  # + the float32 offset
    return total


def worker(method: str, path: str) -> dict:
    import torch
    import transformers

    import qlorafit

    base_rss = _PROC.memory_info().rss
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm_reset = reset_peak_rss()
    base = RssSampler.read()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    if method == "ours-nf4":
        model, _ = qlorafit.load_model(path, quant="nf4")
    elif method == "ours-none":
        model, _ = qlorafit.load_model(path, quant="none")
    elif method == "hf-fp32":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif method == "hf-bnb-nf4":
        cfg = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=cfg, device_map="cpu"
        )
    else:
        raise SystemExit(f"unknown method {method}")
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    peak_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    end = RssSampler.read()
    sampler.update(end)  # the sampler may have missed the last moments
    sizes = model_bytes(model)
    # How much of the RSS after load is memory glibc keeps after it was freed (not live data).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = RssSampler.read()
    # A forward pass on 8 tokens proves the loaded model works (not timed).
    with torch.no_grad():
        logits = model(torch.arange(8).view(1, 8)).logits
    return {
        "method": method,
        "wall_s": wall,
        "baseline_rss": base_rss,
        "baseline_anon": base["anon"],
        "baseline_file": base["file"],
        "baseline_maxrss": base_maxrss,
        "hwm_reset_after_imports": hwm_reset,
        "peak_hwm": end["hwm"],
        "peak_maxrss": peak_maxrss,
        "peak_rss_psutil": sampler.peak["rss"],
        "peak_anon_psutil": sampler.peak["anon"],
        "peak_file_psutil": sampler.peak["file"],
        "rss_after_load": end["rss"],
        "anon_after_load": end["anon"],
        "rss_after_malloc_trim": trimmed["rss"],
        "n_params": sum(p.numel() for p in model.parameters()),
        **sizes,
        "forward_ok": bool(torch.isfinite(logits).all()),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver


def run_one(method: str, path: Path) -> dict:
    return run_worker(__file__, method, ["--dir", str(path)], tail=15)


def summarize(method: str, runs: list[dict]) -> dict:
    """Median (and min, max) over the repeated runs of one loader, of the numbers the table shows."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"method": method, "error": runs[-1]["error"], "runs": len(runs), "failed": len(runs)}

    def delta(r: dict, key: str, base: str = "baseline_rss") -> int:
        return r[key] - r[base]

    size = ok[0]["total_bytes"]
    peak = [delta(r, "peak_hwm") for r in ok]
    return {
        "method": method,
        "runs": len(runs),
        "failed": len(runs) - len(ok),
        "wall_s": spread([r["wall_s"] for r in ok]),
        "baseline_rss": spread([r["baseline_rss"] for r in ok]),
        "peak_delta_hwm": spread(peak),
        "peak_delta_maxrss": spread([delta(r, "peak_maxrss") for r in ok]),
        "peak_delta_rss_psutil": spread([delta(r, "peak_rss_psutil") for r in ok]),
        "peak_delta_anon": spread([delta(r, "peak_anon_psutil", "baseline_anon") for r in ok]),
        "delta_after_load": spread([delta(r, "rss_after_load") for r in ok]),
        "delta_after_malloc_trim": spread([delta(r, "rss_after_malloc_trim") for r in ok]),
        "model_bytes": size,
        "quant_state_bytes": ok[0]["quant_state_bytes"],
        "peak_delta_over_model": spread([d / size for d in peak]),
        "forward_ok": all(r["forward_ok"] for r in ok),
    }


def markdown(rows: list[dict], info: dict) -> str:
    def mib(st: dict, spread: bool = False) -> str:
        text = f"{st['median'] / MiB:.0f}"
        return text + (f" ({st['min'] / MiB:.0f}-{st['max'] / MiB:.0f})" if spread else "")

    lines = [
        f"{info['shape']} Llama ({info['n_params'] / 1e9:.2f}B params), bf16 safetensors on disk "
        f"({info['disk_bytes'] / 2**30:.2f} GiB, {info['n_shards']} shards, page cache warm), loaded to float32 "
        f"on the CPU, torch threads = {info['torch_threads']}, default glibc malloc. Each loader ran "
        f"{info['repeats']} times in a fresh process (round-robin); median (min-max). MiB = 2^20 bytes; "
        f"deltas are over the process RSS after imports (~{info['baseline_rss_mib']:.0f} MiB).",
        "",
        "| loader | wall s | peak RSS delta MiB (VmHWM) | same, ru_maxrss | peak anon delta MiB "
        "| RSS delta after load | after malloc_trim | model size MiB | peak delta / model size |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            last = r["error"].splitlines()[-1] if r["error"] else "failed"
            lines.append(f"| {r['method']} | failed: {last} | | | | | | | |")
            continue
        w, q = r["wall_s"], r["peak_delta_over_model"]
        lines.append(
            f"| {r['method']} | {w['median']:.1f} ({w['min']:.1f}-{w['max']:.1f}) | {mib(r['peak_delta_hwm'], True)} "
            f"| {mib(r['peak_delta_maxrss'])} | {mib(r['peak_delta_anon'])} | {mib(r['delta_after_load'])} "
            f"| {mib(r['delta_after_malloc_trim'])} | {r['model_bytes'] / MiB:.0f} "
            f"| {q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~100M-parameter model instead of 1.1B")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per loader (default 3)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        write_checkpoint(Path(args.dir), args.write_checkpoint)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir)))
        return

    shape = "small" if args.small else "1b"
    t0 = time.perf_counter()
    digest_start = src_digest()
    path, written = ensure_checkpoint(shape)
    write_s = time.perf_counter() - t0
    shards = sorted(path.glob("*.safetensors"))
    for f in shards:  # read every shard once so no loader pays for a cold page cache
        with open(f, "rb") as fh:
            while fh.read(64 * MiB):
                pass
    index = json.loads((path / "model.safetensors.index.json").read_text())
    c = SHAPES[shape]
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(args.repeats):  # round-robin, so slow drifts of the machine hit every loader
        for m in methods:
            runs[m].append({"round": i, **run_one(m, path)})
    rows = [summarize(m, runs[m]) for m in methods]
    ok = [r for rs in runs.values() for r in rs if "error" not in r]
    info = {
        "shape": "TinyLlama-1.1B-shape" if shape == "1b" else "small (~100M)",
        "config": c,
        "checkpoint": str(path),
        "checkpoint_written_now": written,
        "checkpoint_write_s": write_s if written else None,
        "disk_dtype": "bfloat16",
        "disk_bytes": index["metadata"]["total_size"],
        "n_shards": len(shards),
        "n_params": index["metadata"]["total_size"] // 2,
        "torch_threads": ok[0]["torch_threads"] if ok else None,
        "repeats": args.repeats,
        "src_digest": digest_start,
        "src_changed_during_run": src_digest() != digest_start,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "baseline_rss_mib": statistics.median(r["baseline_rss"] for r in ok) / MiB if ok else 0,
        "total_s": time.perf_counter() - t0,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    print(markdown(rows, info))
    for m, rs in runs.items():
        for r in rs:
            if "error" in r:
                print(f"\n{m} (round {r['round']}) failed:\n{r['error']}")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / ("load-small.json" if args.small else "load.json")
    out.write_text(json.dumps({"info": info, "summary": rows, "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
