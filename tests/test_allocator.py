"""The allocator restart: which library the command preloads, and that the restarted command runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlorafit import allocator


def test_system_and_unknown_settings_keep_the_platform_malloc(caplog):
    assert allocator.chosen_allocator("system") is None
    with caplog.at_level("WARNING"):
        assert allocator.chosen_allocator("nonesuch") is None
    assert "nonesuch" in caplog.text


def test_auto_takes_the_preferred_library_when_present(monkeypatch, tmp_path):
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    monkeypatch.setattr(allocator, "_library_dirs", lambda: [tmp_path])
    assert allocator.chosen_allocator("auto") == fake
    assert allocator.chosen_allocator("jemalloc") is None  # asked for by name, not installed
    fake.unlink()
    assert allocator.chosen_allocator("auto") is None


def test_restart_preloads_the_library_once(monkeypatch, tmp_path):
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    monkeypatch.setattr(allocator, "_library_dirs", lambda: [tmp_path])
    monkeypatch.delenv("QLORAFIT_ALLOCATOR_LOADED", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    allocator.preload_allocator(["train", "run.yaml"])
    (path, argv, env), = calls
    assert argv[1:] == ["-m", "qlorafit", "train", "run.yaml"] and path == sys.executable
    assert env["LD_PRELOAD"] == f"{fake}:/other.so" and env["QLORAFIT_ALLOCATOR_LOADED"] == str(fake)
    monkeypatch.setenv("QLORAFIT_ALLOCATOR_LOADED", str(fake))  # the restarted process does not restart
    allocator.preload_allocator(["train", "run.yaml"])
    allocator.preload_allocator(["train", "run.yaml"], "system")
    assert len(calls) == 1


@pytest.mark.skipif(allocator.find_allocator("tcmalloc") is None, reason="libtcmalloc-minimal4 is not installed here")
def test_the_restarted_command_runs_under_tcmalloc():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "QLORAFIT_ALLOCATOR_LOADED")}
    probe = (
        "from qlorafit.allocator import preload_allocator\n"
        "preload_allocator(['plan', '--params', '1M'], 'tcmalloc')\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "fits" in run.stdout  # `qlorafit plan` ran in the restarted process
