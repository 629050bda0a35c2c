"""NF4 dequantization speed: qlorafit vs bitsandbytes on the CPU, side by side in one run.

For each case (double quantization on/off, float32/bfloat16 output) a 4096x4096 weight is
quantized by both libraries, the outputs are checked to be identical (torch.equal), then both
dequantize it `--reps` times with the repetitions interleaved (ours, bnb, ours, bnb, ...) so
machine noise hits both alike; the median is reported. bfloat16 output: bitsandbytes returns
the dtype recorded in its QuantState, so the bf16 cases quantize a bfloat16 copy of the weight
with both libraries (as a user with a bf16 model would) and dequantize to that dtype.

    .venv/bin/python bench/bench_dequant.py            # prints a markdown table
    -> bench/out/dequant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch
from common import src_digest  # bench/common.py

from qlorafit.quant.blockwise import dequantize_4bit, quantize_4bit

OUT = Path(__file__).resolve().parent / "out"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(ours, bnb, reps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds of each call of `ours()` and `bnb()`, run alternately `reps` times after `warmup` each."""
    for _ in range(warmup):
        ours()
        bnb()
    t_ours, t_bnb = [], []
    for i in range(reps):
        # Alternate who goes first so neither always runs on a cache warmed by the other.
        if i % 2 == 0:
            t_ours.append(_timed(ours))
            t_bnb.append(_timed(bnb))
        else:
            t_bnb.append(_timed(bnb))
            t_ours.append(_timed(ours))
    return t_ours, t_bnb


def bench_case(w: torch.Tensor, double_quant: bool, out_dtype: torch.dtype, reps: int, q_reps: int) -> dict:
    w = w.to(out_dtype)  # the state's dtype decides bitsandbytes' output dtype
    n = w.numel()
    packed_o, state_o = quantize_4bit(w, "nf4", 64, double_quant)
    packed_b, state_b = bnbf.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    out_o = dequantize_4bit(packed_o, state_o, dtype=out_dtype)
    out_b = bnbf.dequantize_4bit(packed_b, state_b)
    codes_equal = torch.equal(packed_o, packed_b)
    outputs_equal = out_o.dtype == out_b.dtype == out_dtype and torch.equal(out_o, out_b)
    if not (codes_equal and outputs_equal):
        raise SystemExit(
            f"mismatch (double_quant={double_quant}, {out_dtype}): codes {codes_equal}, outputs {outputs_equal}"
        )
    del out_o, out_b

    dq_ts_o, dq_ts_b = interleaved_times(
        lambda: dequantize_4bit(packed_o, state_o, dtype=out_dtype),
        lambda: bnbf.dequantize_4bit(packed_b, state_b),
        reps,
        warmup=3,
    )
    q_ts_o, q_ts_b = interleaved_times(
        lambda: quantize_4bit(w, "nf4", 64, double_quant),
        lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"),
        q_reps,
        warmup=1,
    )
    dq_o, dq_b = statistics.median(dq_ts_o), statistics.median(dq_ts_b)
    q_o, q_b = statistics.median(q_ts_o), statistics.median(q_ts_b)
    return {
        "double_quant": double_quant,
        "out_dtype": str(out_dtype).removeprefix("torch."),
        "identical_outputs": True,
        "dequant_ours_ms": dq_o * 1e3,
        "dequant_bnb_ms": dq_b * 1e3,
        "dequant_ours_mparams_s": n / dq_o / 1e6,
        "dequant_bnb_mparams_s": n / dq_b / 1e6,
        "dequant_time_ratio_ours_over_bnb": dq_o / dq_b,
        "dequant_ours_min_ms": min(dq_ts_o) * 1e3,
        "dequant_bnb_min_ms": min(dq_ts_b) * 1e3,
        "dequant_min_time_ratio_ours_over_bnb": min(dq_ts_o) / min(dq_ts_b),
        "quant_ours_ms": q_o * 1e3,
        "quant_bnb_ms": q_b * 1e3,
        "quant_time_ratio_ours_over_bnb": q_o / q_b,
    }


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"NF4, blocksize 64, {env['shape'][0]}x{env['shape'][1]} weight, CPU, torch threads = {env['torch_threads']}, "
        f"median of {env['reps']} interleaved reps (quantize: {env['quant_reps']})",
        "",
        "| double quant | output | ours ms | bnb ms | ours Mparams/s | bnb Mparams/s | time ours/bnb | same, of mins "
        "| quantize ours ms | quantize bnb ms | quantize ours/bnb |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['double_quant'] else 'off'} | {r['out_dtype']} | {r['dequant_ours_ms']:.1f} "
            f"| {r['dequant_bnb_ms']:.1f} | {r['dequant_ours_mparams_s']:.0f} | {r['dequant_bnb_mparams_s']:.0f} "
            f"| {r['dequant_time_ratio_ours_over_bnb']:.2f} | {r['dequant_min_time_ratio_ours_over_bnb']:.2f} "
            f"| {r['quant_ours_ms']:.0f} | {r['quant_bnb_ms']:.0f} "
            f"| {r['quant_time_ratio_ours_over_bnb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument(
        "--reps", type=int, default=30, help="timed dequantize repetitions per library (>= 20)"
    )
    parser.add_argument("--quant-reps", type=int, default=5, help="timed quantize repetitions per library")
    args = parser.parse_args()

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.float32)
    env = {
        "shape": [args.size, args.size],
        "reps": args.reps,
        "quant_reps": args.quant_reps,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
        "src_digest": src_digest(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    rows = [
        bench_case(w, dq, dt, args.reps, args.quant_reps)
        for dt in (torch.float32, torch.bfloat16)
        for dq in (True, False)
    ]
    print(markdown(rows, env))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dequant.json").write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {OUT / 'dequant.json'}")


if __name__ == "__main__":
    main()
