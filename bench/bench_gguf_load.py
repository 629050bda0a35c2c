"""Loading a K-quant GGUF: peak memory and time of qlorafit's streaming NF4 load vs transformers.

Writes a randomly initialised llama GGUF with TinyLlama-1.1B's shapes (hidden 2048, 22 layers,
32 heads, 4 KV heads, intermediate 5632, vocab 32000, untied output) in F16, tensor by tensor
(never the whole model in memory), with a byte-level BPE ("gpt2") tokenizer padded with unused
filler tokens to 32000 rows; then quantizes it to Q4_K_M with a real llama.cpp (the test
harness tests/llama_cpp.py) and deletes the F16 file. The Q4_K_M file is cached under
bench/out/ and reused when present. Then each loader runs in a fresh subprocess, so its peak
RSS is its own:

- ours-nf4:   qlorafit.load_model(file, quant="nf4", compute_dtype="float32")
              (dequantizes each GGUF tensor as it streams by, quantizes linear weights to NF4)
- hf-gguf-fp32: AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

Each subprocess reports its RSS after imports (baseline), the wall time of the load, the peak
RSS (the kernel's high-water mark VmHWM from /proc/self/status, reset after the imports and read
right after the load), the peak anonymous RSS (sampled every 5 ms; the rest is file-backed, mostly
pages of the memory-mapped GGUF) and the bytes the loaded model holds (parameters + buffers + 4-bit
states). Each loader runs `--repeats` times (default 2), alternating; the table shows medians.

    .venv/bin/python bench/bench_gguf_load.py [--repeats N]    # prints a markdown table
    -> bench/out/gguf_load.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_load import RssSampler, model_bytes  # bench/bench_load.py: same measurements
from common import ROOT, reset_peak_rss, run_worker, spread, src_digest  # bench/common.py

OUT = Path(__file__).resolve().parent / "out"
MiB = 1024 * 1024
GGUF_PATH = OUT / "llama-1b-Q4_K_M.gguf"
FTYPE = "Q4_K_M"

# TinyLlama-1.1B's shapes
SHAPE = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)
CONTEXT_LENGTH = 2048
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
METHODS = ("ours-nf4", "hf-gguf-fp32")


# --------------------------------------------------------------------------- the GGUF file


def _tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """llama.cpp's tensor names and numpy shapes (rows, cols), in file order."""
    h, f, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * (h // SHAPE["heads"])
    shapes = [("token_embd.weight", (v, h))]
    for i in range(SHAPE["layers"]):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (h,)),
            (f"blk.{i}.attn_q.weight", (h, h)),
            (f"blk.{i}.attn_k.weight", (kv, h)),
            (f"blk.{i}.attn_v.weight", (kv, h)),
            (f"blk.{i}.attn_output.weight", (h, h)),
            (f"blk.{i}.ffn_norm.weight", (h,)),
            (f"blk.{i}.ffn_gate.weight", (f, h)),
            (f"blk.{i}.ffn_up.weight", (f, h)),
            (f"blk.{i}.ffn_down.weight", (h, f)),
        ]
    return shapes + [("output_norm.weight", (h,)), ("output.weight", (v, h))]


def _tokenizer(writer) -> None:
    """tests/tiny_gguf.py's byte-level BPE tokenizer, padded with unused tokens to the embedding's rows."""
    import gguf
    from tiny_gguf import EOS_TOKEN_ID, MERGES, SPECIAL_TOKENS, tokenizer_tokens

    tokens = tokenizer_tokens()
    n_normal = len(tokens) - len(SPECIAL_TOKENS)
    fillers = [f"<unused{i}>" for i in range(SHAPE["vocab"] - len(tokens))]
    types = (
        [int(gguf.TokenType.NORMAL)] * n_normal
        + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
        + [int(gguf.TokenType.UNUSED)] * len(fillers)
    )
    writer.add_vocab_size(SHAPE["vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens + fillers)
    writer.add_token_types(types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(EOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_add_bos_token(False)


def write_f16_gguf(path: Path) -> None:
    """Random llama in F16 (norms F32 ones, weights N(0, 0.02)); each tensor is made only when written."""
    import gguf
    import numpy as np

    h, heads = SHAPE["hidden"], SHAPE["heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("random-llama-1.1b")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(h)
    writer.add_block_count(SHAPE["layers"])
    writer.add_feed_forward_length(SHAPE["intermediate"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(SHAPE["kv_heads"])
    writer.add_rope_dimension_count(h // heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    _tokenizer(writer)

    shapes = _tensor_shapes()
    # Tensor infos first (name, shape, dtype, size), then header, metadata and the info table;
    # then each tensor's data is generated, written and dropped (write_tensor_data keeps no copy).
    for name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape in shapes:  # in the order of the info table
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = np.empty(shape, dtype=np.float16)
            for r in range(0, shape[0], 4096):  # in row chunks: no whole float32 copy of the embedding
                chunk = rng.standard_normal((min(4096, shape[0] - r), shape[1]), dtype=np.float32)
                data[r : r + len(chunk)] = chunk * np.float32(0.02)
        writer.write_tensor_data(data)
        del data
    writer.close()


def make_gguf(path: Path) -> None:
    """F16 GGUF -> Q4_K_M with llama.cpp, written to a temporary name and renamed; the F16 file is deleted."""
    from llama_cpp import quantize  # tests/llama_cpp.py

    f16 = path.with_name(path.stem + "-F16.gguf.tmp")
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_f16_gguf(f16)
        quantize(f16, tmp, FTYPE)
        os.replace(tmp, path)
    finally:
        f16.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def ensure_gguf() -> tuple[Path, bool, float]:
    if GGUF_PATH.is_file():
        return GGUF_PATH, False, 0.0
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # In a subprocess: the driver stays small (a child's ru_maxrss starts from the parent's RSS)
    # and llama.cpp, which aborts the process on a failed assert, is never loaded into it.
    subprocess.run([sys.executable, __file__, "--write-gguf", str(GGUF_PATH)], check=True)
    return GGUF_PATH, True, time.perf_counter() - t0


# --------------------------------------------------------------------------- worker (one load)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(method: str, path: str) -> dict:
    import torch
    import transformers

    import qlorafit

    base = RssSampler.read()
    hwm_reset = reset_peak_rss()
    sampler = RssSampler()  # for the split into anonymous and file-backed (mapped GGUF) memory
    sampler.start()
    t0 = time.perf_counter()
    if method == "ours-nf4":
        model, _ = qlorafit.load_model(path, quant="nf4", compute_dtype="float32")
    elif method == "hf-gguf-fp32":
        p = Path(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch.float32, local_files_only=True
        )
    else:
        raise SystemExit(f"unknown method {method}")
    wall = time.perf_counter() - t0
    peak = _vm_hwm()
    sampler.stop.set()
    sampler.join()
    end = RssSampler.read()
    sampler.update(end)
    sizes = model_bytes(model)
    # A forward pass on 8 tokens proves the loaded model works (not timed, after the peak was read).
    with torch.no_grad():
        logits = model(torch.arange(8).view(1, 8)).logits
    return {
        "method": method,
        "wall_s": wall,
        "baseline_rss": base["rss"],
        "baseline_anon": base["anon"],
        "hwm_reset_after_imports": hwm_reset,
        "peak_hwm": peak,
        "peak_anon_psutil": sampler.peak["anon"],
        "peak_file_psutil": sampler.peak["file"],
        "rss_after_load": end["rss"],
        "anon_after_load": end["anon"],
        "n_params": sum(p.numel() for p in model.parameters()),
        **sizes,
        "forward_ok": bool(torch.isfinite(logits).all()),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver


def run_one(method: str, path: Path) -> dict:
    return run_worker(__file__, method, ["--file", str(path)], tail=30)


def summarize(method: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"method": method, "error": runs[-1]["error"], "runs": len(runs), "failed": len(runs)}

    return {
        "method": method,
        "runs": len(runs),
        "failed": len(runs) - len(ok),
        "wall_s": spread([r["wall_s"] for r in ok]),
        "baseline_rss": spread([r["baseline_rss"] for r in ok]),
        "peak_hwm": spread([r["peak_hwm"] for r in ok]),
        "peak_delta_hwm": spread([r["peak_hwm"] - r["baseline_rss"] for r in ok]),
        "peak_delta_anon": spread([r["peak_anon_psutil"] - r["baseline_anon"] for r in ok]),
        "rss_after_load": spread([r["rss_after_load"] for r in ok]),
        "anon_after_load": spread([r["anon_after_load"] for r in ok]),
        "model_bytes": ok[0]["total_bytes"],
        "quant_state_bytes": ok[0]["quant_state_bytes"],
        "n_params": ok[0]["n_params"],
        "forward_ok": all(r["forward_ok"] for r in ok),
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    cpu = models[0] if models else platform.processor()
    cores, python = os.cpu_count(), platform.python_version()
    return {"cpu": cpu, "cores": cores, "ram_bytes": mem_kib * 1024, "python": python}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "gguf")}


def markdown(rows: list[dict], info: dict) -> str:
    def mib(x: float) -> str:
        return f"{x / MiB:.0f}"

    lines = [
        f"TinyLlama-1.1B-shape random llama ({info['n_params'] / 1e9:.2f}B params), {FTYPE} GGUF "
        f"({info['file_bytes'] / MiB:.0f} MiB, page cache warm), loaded on the CPU, torch threads = "
        f"{info['torch_threads']}. Each loader ran {info['repeats']} times in a fresh process, "
        f"alternating; median (min-max). MiB = 2^20 bytes; baseline = process RSS after imports.",
        "",
        "| loader | wall s | peak RSS MiB (VmHWM) | peak delta over baseline MiB | peak anon delta MiB "
        "| RSS after load MiB | model size MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            last = r["error"].splitlines()[-1] if r["error"] else "failed"
            lines.append(f"| {r['method']} | failed: {last} | | | | | |")
            continue
        w, p, d = r["wall_s"], r["peak_hwm"], r["peak_delta_hwm"]
        lines.append(
            f"| {r['method']} | {w['median']:.1f} ({w['min']:.1f}-{w['max']:.1f}) "
            f"| {mib(p['median'])} ({mib(p['min'])}-{mib(p['max'])}) | {mib(d['median'])} "
            f"| {mib(r['peak_delta_anon']['median'])} | {mib(r['rss_after_load']['median'])} "
            f"| {mib(r['model_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process loads per loader (default 2)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--write-gguf", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_gguf:
        sys.path.insert(0, str(ROOT / "tests"))  # tiny_gguf.py, llama_cpp.py
        make_gguf(Path(args.write_gguf))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.file)))
        return

    t0 = time.perf_counter()
    digest_start = src_digest()
    path, written, write_s = ensure_gguf()
    with open(path, "rb") as fh:  # read once so no loader pays for a cold page cache
        while fh.read(64 * MiB):
            pass
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(args.repeats):  # alternating, and which loader goes first too
        for m in methods if i % 2 == 0 else methods[::-1]:
            runs[m].append({"round": i, **run_one(m, path)})
    rows = [summarize(m, runs[m]) for m in methods]
    ok = [r for rs in runs.values() for r in rs if "error" not in r]
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "versions": versions(),
        "src_digest": digest_start,
        "src_changed_during_run": src_digest() != digest_start,
        "shape": SHAPE,
        "file": str(path),
        "file_type": FTYPE,
        "file_bytes": path.stat().st_size,
        "file_written_now": written,
        "file_write_s": write_s if written else None,
        "n_params": sum(math.prod(shape) for _, shape in _tensor_shapes()),
        "torch_threads": ok[0]["torch_threads"] if ok else None,
        "repeats": args.repeats,
        "total_s": time.perf_counter() - t0,
    }
    print(markdown(rows, info))
    for m, rs in runs.items():
        for r in rs:
            if "error" in r:
                print(f"\n{m} (round {r['round']}) failed:\n{r['error']}")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "gguf_load.json"
    out.write_text(json.dumps({"info": info, "summary": rows, "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
