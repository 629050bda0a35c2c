"""Writing an export file: atomically, and with an ExportError a user can act on when it fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ExportError, cannot_write
from ..fileio import atomic_write


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """`atomic_write` for an export: an unwritable path or a full disk is an ExportError naming the
    path, and no partial file is left behind (the temporary file is removed)."""
    try:
        return atomic_write(path, write)
    except OSError as exc:  # atomic_write's WriteError, or an OSError of `write`
        raise ExportError(str(cannot_write(path, exc))) from exc
