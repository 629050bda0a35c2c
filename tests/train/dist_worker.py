"""One rank of a multi-process training test: `python -m tests.train.dist_worker SPEC.json RANK`.

The spec names the run config, the world size, a file store and the faults to inject. Ranks
start their process group on the file store with the spec's timeout (no torchrun, no ports);
a world of 1 trains without any group, as a plain single process does. Every rank uses one
thread, so 1, 2 and 3 processes multiply with the same summation order.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qlorafit.config import build_config
from qlorafit.errors import QlorafitError, TrainingInterrupted
from qlorafit.train import loop
from qlorafit.train.run import run_training


def _faults(spec: dict, rank: int) -> None:
    """Wrap the loss of this rank: a NaN at a step, or a stop (marker file, then sleep) at a step."""
    nan_at, hang_at = spec.get("nan_at", {}), spec.get("hang_at", {})
    if str(rank) not in nan_at and str(rank) not in hang_at:
        return
    original, calls = loop.causal_lm_loss, {"n": 0}
    per_step = len(range(rank, spec["grad_accum"], spec["world"]))  # micro-batches this rank runs per step

    def patched(model, batch, *args, **kwargs):
        step = calls["n"] // per_step + 1
        calls["n"] += 1
        if hang_at.get(str(rank)) == step:
            Path(spec["marker"]).write_text(str(step))
            time.sleep(3600)
        loss_sum, count = original(model, batch, *args, **kwargs)
        if nan_at.get(str(rank)) == step:
            loss_sum = loss_sum * float("nan")
        return loss_sum, count

    loop.causal_lm_loss = patched


def _report_shards(spec: dict, rank: int) -> None:
    """Record (bytes of 4-bit codes this rank holds, bytes of all codes) once the base is loaded."""
    from qlorafit.train import run

    original = run.code_bytes

    def code_bytes_reported(model):
        result = original(model)
        Path(spec["marker"]).with_name(f"shards-{rank}.json").write_text(json.dumps(result))
        return result

    run.code_bytes = code_bytes_reported


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    torch.set_num_threads(1)
    if spec["world"] > 1:
        dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=spec["world"],
                                timeout=datetime.timedelta(seconds=spec.get("timeout", 300)))
    _faults(spec, rank)
    _report_shards(spec, rank)
    try:
        run_training(build_config(spec["config"]), resume=spec.get("resume", False))
    except TrainingInterrupted as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except QlorafitError as exc:
        print(f"rank {rank}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
