"""`make gpu-check`: the test suite and the training benchmark on a CUDA GPU, summed up in one table.

1. the device tests (`pytest -m device`, tests/test_devices.py): every device-dependent path on
   the CPU and on CUDA, compared with the CPU's results (4-bit and 8-bit codes bit for bit,
   training steps within a float32 tolerance, paged and 8-bit optimizers, generation);
2. the whole test suite, where `load_model(device="auto")` puts the models on the GPU;
3. `bench/bench_train.py --device cuda`: qlorafit against transformers + bitsandbytes + peft on
   the GPU, same run, with peak GPU memory (bench/out/train-cuda.md).

It stops with exit code 2 on a machine without a CUDA device (`torch.cuda.is_available()` false),
since nothing it checks can run there. Exit code 1 when any part fails.

    .venv/bin/python bench/gpu_check.py [--steps 6] [--skip-suite]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from common import ROOT  # bench/common.py


def _run(name: str, cmd: list[str], env: dict | None = None) -> dict:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    print(out[-3000:], flush=True)
    summary = re.findall(r"^=+ (.*) in [\d.]+s", out, flags=re.M)
    return {"part": name, "ok": proc.returncode == 0, "rc": proc.returncode,
            "summary": summary[-1] if summary else out.strip().splitlines()[-1] if out.strip() else "",
            "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-suite", action="store_true", help="only the device tests and the benchmark")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("make gpu-check needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run it on a machine with "
              "an NVIDIA GPU and a CUDA build of torch; the CPU checks are in make test.", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    py = sys.executable
    results = [_run("device tests (cpu, cuda)", [py, "-m", "pytest", "-q", "-m", "device"],
                    {"QLORAFIT_TEST_DEVICES": "cpu,cuda"})]
    if not args.skip_suite:
        results.append(_run("test suite", [py, "-m", "pytest", "-q"]))
    results.append(_run("training benchmark vs peft + bitsandbytes",
                        [py, "bench/bench_train.py", "--device", "cuda", "--steps", str(args.steps)]))
    print("\n| part | result | summary | s |\n|---|---|---|---:|")
    for r in results:
        result = "pass" if r["ok"] else f"FAIL (exit {r['rc']})"
        print(f"| {r['part']} | {result} | {r['summary']} | {r['seconds']:.0f} |")
    table = ROOT / "bench" / "out" / "train-cuda.md"
    if table.is_file():
        print("\n" + table.read_text())
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
