"""GGUF export of a 1.1B model: time and peak memory of `export_gguf`, next to llama.cpp's quantizer.

The model is bench_gguf_load.py's random-weight Llama with TinyLlama-1.1B's shapes, a Q4_K_M GGUF
file (bench/out/llama-1b-Q4_K_M.gguf, written by that script when missing), loaded as a user
starting from a GGUF file loads it and held as it is after a QLoRA run: NF4 with double
quantization, LoRA r=16 alpha 32 on every linear layer with non-zero B. The exported files take
their tokenizer from that source file. Each measurement runs in a fresh subprocess:

- ours-<type>: `qlorafit.export_gguf(model, tokenizer, path, type=<type>)` for f32, q8_0 and
  q4_k_m: LoRA merged into the dequantized NF4 weights layer by layer, llama.cpp's layouts and
  per-tensor types, quantized by qlorafit (numpy, one thread), written atomically.
- llama.cpp-<type>: llama.cpp's own `llama_model_quantize` (2 threads, the real library of the
  test harness tests/llama_cpp.py) from our f32 file to q8_0 and q4_k_m: the quantization step a
  user of llama.cpp's converter runs after `convert_hf_to_gguf.py` (whose merge and conversion
  is not installable here, so it is not timed).

Reported: the wall time of the export call (ours: the load and adding LoRA are timed apart), the
peak RSS of the export phase (VmHWM reset after the load) and of the whole process, and the size
of the file.

    .venv/bin/python bench/bench_export.py            # prints a markdown table
    -> bench/out/export.json; the GGUF files go to bench/out/export/ and are deleted after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import ROOT, reset_peak_rss, run_worker, src_digest  # bench/common.py

OUT = ROOT / "bench" / "out"
SOURCE = OUT / "llama-1b-Q4_K_M.gguf"
WORK = OUT / "export"
MiB = 1024 * 1024
TYPES = ("f32", "q8_0", "q4_k_m")
LLAMA_TYPES = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _ours(file_type: str) -> dict:
    import torch

    import qlorafit

    start = time.perf_counter()
    model, tokenizer = qlorafit.load_model(SOURCE, quant="nf4", compute_dtype="float32")
    torch.manual_seed(0)  # the same adapter in every worker, so their files can be compared byte for byte
    qlorafit.add_lora(model, r=16, alpha=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    load_s = time.perf_counter() - start
    loaded = _hwm_mib()
    reset_peak_rss()
    path = WORK / f"ours-{file_type}.gguf"
    start = time.perf_counter()
    qlorafit.export_gguf(model, tokenizer, path, type=file_type)
    return {"load_s": load_s, "export_s": time.perf_counter() - start, "peak_export_mib": _hwm_mib(),
            "peak_mib": max(loaded, _hwm_mib()), "file_mib": path.stat().st_size / MiB}


def _llama_cpp(file_type: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import llama_cpp  # tests/llama_cpp.py

    out = WORK / f"llama.cpp-{file_type}.gguf"
    reset_peak_rss()
    start = time.perf_counter()
    llama_cpp.quantize(WORK / "ours-f32.gguf", out, LLAMA_TYPES[file_type])
    return {"export_s": time.perf_counter() - start, "peak_export_mib": _hwm_mib(), "peak_mib": _hwm_mib(),
            "file_mib": out.stat().st_size / MiB}


def _same_bytes(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np

    mine, ref = gguf.GGUFReader(a), gguf.GGUFReader(b)
    by_name = {t.name: t for t in ref.tensors}
    return all(t.tensor_type == by_name[t.name].tensor_type
               and np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(by_name[t.name].data).view(np.uint8))
               for t in mine.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--type")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((_ours if args.worker == "ours" else _llama_cpp)(args.type)))
        return
    if not SOURCE.is_file():
        from bench_gguf_load import ensure_gguf  # bench/bench_gguf_load.py writes it

        ensure_gguf()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for file_type in TYPES:
        rows.append({"stack": "qlorafit", "type": file_type, **run_worker(__file__, "ours", ["--type", file_type])})
        print(rows[-1], flush=True)
    for file_type in LLAMA_TYPES:
        rows.append({"stack": "llama.cpp quantize", "type": file_type,
                     **run_worker(__file__, "llama", ["--type", file_type])})
        print(rows[-1], flush=True)
    identical = {t: _same_bytes(WORK / f"ours-{t}.gguf", WORK / f"llama.cpp-{t}.gguf") for t in LLAMA_TYPES}
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "src": src_digest(), "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "identical_bytes": identical,
            "command": "python bench/bench_export.py"}
    (OUT / "export.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    lines = ["| stack | type | load s | export s | export-phase peak RSS MiB | process peak MiB | file MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stack']} | {r['type']} | failed: {r['error'].splitlines()[-1]} | | | | |")
            continue
        load = f"{r['load_s']:.1f}" if "load_s" in r else ""
        lines.append(f"| {r['stack']} | {r['type']} | {load} | {r['export_s']:.1f} | {r['peak_export_mib']:,.0f} "
                     f"| {r['peak_mib']:,.0f} | {r['file_mib']:,.0f} |")
    print("\n".join(lines))
    print(f"\nour q8_0 / q4_k_m tensors byte-identical to llama.cpp's quantization of our f32 file: {identical}")
    for f in WORK.glob("*.gguf"):
        f.unlink()


if __name__ == "__main__":
    main()
