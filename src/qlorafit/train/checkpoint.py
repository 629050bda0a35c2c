"""Checkpoints: everything a run needs to continue exactly where it stopped.

`output_dir/checkpoints/step-N/` holds the adapter (PEFT layout), `state.pt` (optimizer and
scheduler state, RNG states, the data position) and `manifest.json` (size and sha256 of each
file, and the run's fingerprint for `--resume` to compare). A checkpoint is written under a temporary name, synced, then renamed, so a folder named
`step-N` is always complete; the newest one whose manifest verifies is the one resumed from.
Only files this module wrote are read back, with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import QlorafitError
from ..faults import reached
from ..lora.peft_io import load_adapter, save_adapter

logger = logging.getLogger(__name__)
PREFIX = "step-"


class CheckpointError(QlorafitError):
    """A checkpoint that is missing, incomplete or corrupt."""


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    skipped: int = 0  # steps whose update was skipped (NaN or infinite loss or gradient)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """The random number generator states a resumed run must restore."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model, optimizer, scheduler, position: Position, keep_last: int,
                    fingerprint: dict | None = None) -> Path:
    """Write `root/step-N` atomically and remove all but the newest `keep_last` checkpoints.

    `fingerprint` (`config.fingerprint`) records what the run's results depend on, for `--resume`
    to compare.

    If writing fails (a full disk, a quota), the partial folder is removed, every earlier
    checkpoint is left as it was, and a CheckpointError says what happened.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{position.step}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp)
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "position": asdict(position)}
        torch.save(state, tmp / "state.pt")
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"step": position.step, "files": files, "fingerprint": fingerprint}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _fsync_tree(tmp)
        reached("checkpoint-write")  # a test may kill the process here: written, not yet renamed
        if final.exists():  # the same step again (a resumed run's final save): swap, never delete first
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:
        reason = "the disk is full" if getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc) else str(exc)
        previous = [p.name for p in list_checkpoints(root)]
        raise CheckpointError(
            f"{final}: could not write the checkpoint ({reason}); it was not saved and the earlier checkpoints "
            f"({', '.join(previous) or 'none'}) are untouched. Free space, then continue with --resume."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(root: Path) -> list[str]:
    """Delete temporary folders left by a checkpoint write that was killed; returns their names."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(f".{PREFIX}") and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(folder: Path) -> str | None:
    """None when every file of the manifest is present with its size and hash, else what is wrong."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable manifest ({exc})"
    if not isinstance(files, dict):
        return "manifest has no file table"
    for name, meta in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or \
                not isinstance(meta, dict):
            return f"manifest names a file outside the checkpoint ({name!r})"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta.get("size") or _sha256(path) != meta.get("sha256"):
            return f"{name} does not match its manifest (size or sha256)"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; the ones skipped are logged with the reason."""
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def read_fingerprint(folder: Path) -> dict | None:
    """The fingerprint a checkpoint was saved with, from its manifest (None: none recorded)."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{folder / 'manifest.json'}: cannot be read ({exc})") from exc


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> Position:
    """Restore adapter, optimizer, scheduler and RNG states; returns the data position."""
    problem = verify(folder)
    if problem is not None:
        raise CheckpointError(f"{folder}: {problem}; delete it to resume from an older checkpoint")
    load_adapter(model, folder)
    try:
        state = torch.load(folder / "state.pt", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{folder / 'state.pt'}: cannot be read ({exc})") from exc
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"])
