"""The memory allocator the `qlorafit` command runs under.

glibc's malloc keeps much of what PyTorch frees during a training step (large temporaries that
come and go every layer) instead of giving it back, so the process's resident memory sits well
above what it uses. jemalloc, tcmalloc and mimalloc return memory sooner. A library can only
replace malloc if it is loaded before anything else, so the command re-executes itself once with
the library in `LD_PRELOAD` (`preload_allocator`); when no library is found, or on a platform
without `LD_PRELOAD`, it runs on as it is.

`QLORAFIT_ALLOCATOR` (or `qlorafit --allocator`) picks one (`tcmalloc`, `jemalloc`, `mimalloc`),
`auto` (the default) takes tcmalloc when it is installed, and `system` keeps the platform's malloc. The libraries come from the system's packages
(Debian: libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0) or, for mimalloc, the
`cmeel-mimalloc` wheel.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
# What `auto` uses. Measured on the QLoRA training step (docs/benchmarks.md, "Allocator"): tcmalloc
# was faster than glibc and a third smaller at peak; jemalloc as small but slower with
# checkpointing, mimalloc slower without it. Those two are there to be chosen by name.
PREFERENCE = ("tcmalloc",)
ENV = "QLORAFIT_ALLOCATOR"
_MARK = "QLORAFIT_ALLOCATOR_LOADED"  # set on the re-executed process: never re-execute twice
_FILES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so.2.0", "libmimalloc.so"),
}


def _library_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [Path("/usr/lib") / multiarch, Path("/lib") / multiarch, Path("/usr/lib64"), Path("/usr/lib"),
            Path("/usr/local/lib")]
    # the cmeel-mimalloc wheel's prefix inside this environment
    dirs.append(Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib")
    return [d for d in dirs if d.is_dir()]


def find_allocator(name: str) -> Path | None:
    """The shared library of allocator `name` on this machine, or None."""
    for folder in _library_dirs():
        for file in _FILES[name]:
            if (folder / file).is_file():
                return folder / file
    return None


def chosen_allocator(setting: str | None = None) -> Path | None:
    """The library `setting` (default: $QLORAFIT_ALLOCATOR, else auto) selects, or None for the platform's malloc."""
    setting = (setting or os.environ.get(ENV) or "auto").lower()
    if setting == "system":
        return None
    if setting == "auto":
        return next((lib for name in PREFERENCE if (lib := find_allocator(name)) is not None), None)
    if setting not in ALLOCATORS:
        logger.warning("%s=%s is not one of auto, system, %s; using the platform's malloc", ENV, setting, ", ".join(ALLOCATORS))
        return None
    library = find_allocator(setting)
    if library is None:
        logger.warning("%s=%s: the library is not installed; using the platform's malloc", ENV, setting)
    return library


def preload_allocator(argv: list[str], setting: str | None = None) -> None:
    """Re-execute this process with the chosen allocator preloaded; returns when nothing is to be done."""
    if os.environ.get(_MARK) or not sys.platform.startswith("linux"):
        return
    library = chosen_allocator(setting)
    if library is None or str(library) in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{library}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(library)
    env[_MARK] = str(library)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "qlorafit", *argv], env)
    except OSError as exc:  # cannot re-execute: go on with the platform's malloc
        logger.warning("could not restart under %s (%s); using the platform's malloc", library, exc)
