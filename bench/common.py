"""Helpers shared by the benchmark scripts (standard library only: they also run in bench/.venv-peer)."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def src_digest() -> str:
    """sha256 over qlorafit's source files: which state of src/ these numbers were measured on."""
    root = ROOT / "src"
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so it measures from now on; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_worker(script: str, method: str, args: list[str], tail: int = 30, python: str | Path | None = None) -> dict:
    """Run `script --worker method *args` in a fresh interpreter; its last stdout line is a JSON result.

    `python` picks the interpreter (another virtual environment's; default this one). A failed
    worker gives {"method", "error"} with the last `tail` lines of its output.
    """
    cmd = [str(python or sys.executable), script, "--worker", method, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()[-tail:]
        return {"method": method, "error": "\n".join(lines)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
