"""`qlorafit train --nproc N` through torchrun's launcher: same adapter as one process, signals reach every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_chat_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, model: str, out: str, **train) -> Path:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_chat_jsonl(data, 16)
    tree = {"model": model, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": str(data), "max_length": 64},
            "train": {"batch_size": 2, "grad_accum": 2, "lr": 5e-3, **train}, "output_dir": str(tmp_path / out)}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _qlorafit(*args: str, threads: str | None = None, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE")}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.Popen([sys.executable, "-m", "qlorafit", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _ok(proc: subprocess.Popen, limit: float = 300) -> str:
    out, err = proc.communicate(timeout=limit)
    assert proc.returncode == 0, err[-4000:]
    return out


def _adapter(tmp_path: Path, out: str) -> bytes:
    return (tmp_path / out / "adapter" / "adapter_model.safetensors").read_bytes()


def _nproc_matches_one_process(tmp_path: Path, model: str, steps: int) -> None:
    out = _ok(_qlorafit("train", str(_config(tmp_path, model, "two", max_steps=steps)), "--nproc", "2", threads="1"))
    assert out.count("adapter: ") == 1  # rank 0 alone reports
    _ok(_qlorafit("train", str(_config(tmp_path, model, "one", max_steps=steps)), threads="1"))
    assert _adapter(tmp_path, "two") == _adapter(tmp_path, "one")


def test_nproc_2_through_torchrun_gives_the_one_process_adapter(tmp_path, tiny_chat_model_dir):
    _nproc_matches_one_process(tmp_path, str(tiny_chat_model_dir), steps=3)


@pytest.mark.real_model
def test_real_model_on_two_ranks_gives_the_one_process_adapter(tmp_path, smollm2_path):
    _nproc_matches_one_process(tmp_path, str(smollm2_path), steps=2)


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path, tiny_chat_model_dir):
    config = _config(tmp_path, str(tiny_chat_model_dir), "stopped", max_steps=100000, keep_last=5)
    launcher = _qlorafit("train", str(config), "--nproc", "2", threads="1", start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()[1][-4000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "SIGTERM received: stopped after step" in err, err[-4000:]
    assert "another rank failed" not in err, err[-4000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = rows[-1]["step"]
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == [f"step-{last}"]
