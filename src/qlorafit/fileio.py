"""Writing a file so that a crash or a bad input never leaves it half-written.

The content goes to a temporary name in the same folder, is synced to disk, then renamed over
the target: readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from .errors import cannot_write


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to produce the file at a temporary path, then move it to `path`.

    A failure (no permission, a full disk, a file where a folder should be) is a WriteError
    naming `path`; the old file, if any, is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path
