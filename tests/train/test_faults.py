"""Training that survives being killed, interrupted, fed NaNs and given a full disk.

The kill tests run `qlorafit train` in a real subprocess that SIGKILLs itself at named points
(`qlorafit.faults`): after a step, inside a checkpoint write, inside the final save. Each time the run is resumed with --resume; at the end its adapter must be
byte-identical to the adapter of a run that was never interrupted.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlorafit.errors import QlorafitError, TrainingError
from qlorafit.train.checkpoint import CheckpointError, list_checkpoints, verify
from qlorafit.train.run import run_training
from tests.train.test_run import _config

STEPS = 12


def _yaml(tmp_path: Path, model_dir: Path, out: str, **train) -> Path:
    from tests.conftest import write_chat_jsonl

    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_chat_jsonl(data, 48)
    settings = {"max_steps": STEPS, "batch_size": 4, "lr": 5e-3, "save_every": 1, "keep_last": 2, **train}
    path = tmp_path / f"{out}.yaml"
    path.write_text(
        f"model: {model_dir}\nquant: {{type: nf4}}\nlora: {{r: 4, alpha: 8, dropout: 0.1}}\n"
        f"data: {{train: {data}, max_length: 64}}\ntrain: {json.dumps(settings)}\noutput_dir: {tmp_path / out}\n"
    )
    return path


def _start(config: Path, resume: bool, kill_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qlorafit.cli", "train", str(config)] + (["--resume"] if resume else [])
    env = {k: v for k, v in os.environ.items() if k != "QLORAFIT_KILL_AT"}
    if kill_at:
        env["QLORAFIT_KILL_AT"] = kill_at
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """Poll until `ready()` is true (then True) or the process ends (then False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the training process neither reached the kill point nor finished")


def _steps_logged(out: Path) -> int:
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    except OSError:
        return 0


def test_sigkill_at_many_points_then_resume_gives_the_same_adapter(tiny_chat_model_dir, tmp_path):
    reference = _yaml(tmp_path, tiny_chat_model_dir, "straight")
    assert _start(reference, resume=False).wait() == 0
    expected = (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()

    config = _yaml(tmp_path, tiny_chat_model_dir, "killed")
    out = tmp_path / "killed"
    # Kill points, in the order a run meets them, each named in the code (qlorafit.faults): after
    # a step, inside a checkpoint write (written, not yet renamed), inside the final save. Each
    # launch counts its own arrivals; every one of them must die there, by SIGKILL.
    points = ["step:1", "step:2", "step:2", "checkpoint-write:1", "checkpoint-write:2", "checkpoint-write:1",
              "step:3", "final-save:1"]
    for n, point in enumerate(points):
        proc = _start(config, resume=n > 0, kill_at=point)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err[-3000:])
        if point.startswith("checkpoint-write"):  # the killed write left a temporary folder behind
            assert any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())
    assert (out / "adapter").is_dir() and not (out / "summary.json").exists()  # killed inside the final save
    proc = _start(config, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == expected
    assert all(verify(c) is None for c in list_checkpoints(out / "checkpoints"))
    assert not any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every step logged once, in order


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(tiny_chat_model_dir, tmp_path, sig, code):
    config = _yaml(tmp_path, tiny_chat_model_dir, "run", save_every=0, max_steps=40)
    out = tmp_path / "run"
    proc = _start(config, resume=False)
    assert _wait_for(proc, lambda: _steps_logged(out) >= 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"{signal.Signals(sig).name} received" in err and "--resume" in err
    saved = list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and verify(saved[0]) is None
    assert 2 <= int(saved[0].name.split("-")[1]) < 40
    proc = _start(config, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _nan_on_calls(monkeypatch, calls: set[int] | None):
    """Make the loss NaN on the given calls of causal_lm_loss (all calls from the first when None)."""
    import qlorafit.train.loop as loop

    real, count = loop.causal_lm_loss, [0]

    def poisoned(model, batch):
        count[0] += 1
        total, n = real(model, batch)
        if calls is None or count[0] in calls:
            total = total * float("nan")
        return total, n

    monkeypatch.setattr(loop, "causal_lm_loss", poisoned)


def test_a_nan_step_is_skipped_and_counted(tiny_chat_model_dir, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {3})
    cfg = _config(tiny_chat_model_dir, tmp_path, max_steps=5)
    run_training(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped == [3]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nan_steps_in_a_row_stop_the_run(tiny_chat_model_dir, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, set(range(3, 100)))
    cfg = _config(tiny_chat_model_dir, tmp_path, max_steps=20, save_every=1, keep_last=5, max_bad_steps=3)
    with pytest.raises(TrainingError, match=r"3 steps in a row \(up to step 5\).*last good checkpoint is .*step-4"):
        run_training(cfg)
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == ["step-1", "step-2", "step-3", "step-4"]
    assert all(verify(p) is None for p in saved)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_works(tiny_chat_model_dir, tmp_path,
                                                                               monkeypatch):
    import qlorafit.train.checkpoint as ckpt

    real_save, calls = torch.save, [0]

    def full_disk(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the third checkpoint: write part of the file, then run out of space
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    cfg = _config(tiny_chat_model_dir, tmp_path, max_steps=6, save_every=1, keep_last=5)
    with pytest.raises(CheckpointError, match=r"step-3: could not write the checkpoint \(the disk is full\).*"
                                              r"step-1, step-2.*untouched.*--resume"):
        run_training(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-1", "step-2"]
    assert all(verify(p) is None for p in list_checkpoints(root))
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no half-written folder left
    monkeypatch.setattr(ckpt.torch, "save", real_save)  # space freed
    run_training(cfg, resume=True)
    straight = _config(tiny_chat_model_dir, tmp_path, out="straight", max_steps=6, save_every=1, keep_last=5)
    run_training(straight)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_checkpoint_manifests_cannot_point_outside_their_folder(tiny_chat_model_dir, tmp_path):
    cfg = _config(tiny_chat_model_dir, tmp_path, max_steps=2, save_every=1)
    run_training(cfg)
    folder = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../config.yaml"] = {"size": 1, "sha256": "0"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "outside the checkpoint" in verify(folder)


def test_run_files_cannot_be_redirected_outside_output_dir(tiny_chat_model_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(elsewhere)
    cfg = _config(tiny_chat_model_dir, tmp_path, max_steps=1)
    with pytest.raises(QlorafitError, match="checkpoints is a symbolic link"):
        run_training(cfg, resume=True)
    assert not any(elsewhere.iterdir())
